"""spectral_jax: spectral state space models (STU) in JAX / Flax NNX, distilled to linear
dynamical systems (SpectraLDS) for constant-time generation.

Modules (import what you need; nothing heavy is imported here):

* :mod:`spectral_jax.filters` -- Hankel matrices and spectral filters for any length.
* :mod:`spectral_jax.conv`, :mod:`spectral_jax.stu_ops` -- FFT convolution, the STU formula.
* :mod:`spectral_jax.lds`, :mod:`spectral_jax.lds_compensated` -- diagonal LDS scans and steps.
* :mod:`spectral_jax.distill` -- fit LDS banks to the filters, convert STU parameters.
* :mod:`spectral_jax.futurefill`, :mod:`spectral_jax.generate` -- decoding and sampling.
* :mod:`spectral_jax.nn` -- ``STU``, ``LDSLayer``, attention, blocks, ``SpectralModel``.
* :mod:`spectral_jax.train` -- data, sharding, optimizer, checkpoints, the training loop.
* :mod:`spectral_jax.inference` -- trained and distilled checkpoints for inference.
"""
