"""Pure math, no parameters and no modules: the lowest floor of spectral_jax.

* :mod:`~spectral_jax.ops.filters` -- Hankel matrices and spectral filters for any length.
* :mod:`~spectral_jax.ops.disk_cache` -- the atomic on-disk store of float64 arrays.
* :mod:`~spectral_jax.ops.conv` -- causal FFT convolution (and its direct reference).
* :mod:`~spectral_jax.ops.stu_ops` -- the STU formula.
* :mod:`~spectral_jax.ops.projection` -- the two STU projections (full, tensordot) as one
  object each: parameter shapes, conv inputs, contraction, LDS readout and conversion.
* :mod:`~spectral_jax.ops.lds`, :mod:`~spectral_jax.ops.lds_compensated` -- diagonal LDS scans
  and steps, plain and in float32 pairs.
* :mod:`~spectral_jax.ops.lds_arithmetic` -- the two LDS arithmetics (plain, compensated) as
  one object each, which distilled layers look up.
* :mod:`~spectral_jax.ops.distilled_lds` -- a distilled layer's LDS: drive, readout, FFT prefill,
  scans and steps; :mod:`~spectral_jax.ops.lds_continuation` -- prompts past its kernels, in
  blocks.
* :mod:`~spectral_jax.ops.conv_decode` -- naive and FutureFill decode caches of convolutions.
"""
