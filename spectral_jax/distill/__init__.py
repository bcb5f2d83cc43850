"""SpectraLDS distillation: fit an LDS bank to the spectral filters and convert STU layers.

- :mod:`~spectral_jax.distill.bank`: :class:`LDSBank` (decays and coefficients), save and load;
- :mod:`~spectral_jax.distill.fit`: :func:`fit_lds_bank`, the float64 least-squares fit;
- :mod:`~spectral_jax.distill.convert`: :func:`stu_to_lds`, STU parameters -> LDS parameters;
- :mod:`~spectral_jax.distill.report`: the accuracy report of a fitted bank.

This floor sits on ``ops`` and below ``nn``: walking an nnx model to distill every STU is
:mod:`spectral_jax.nn.distillation`.
"""
