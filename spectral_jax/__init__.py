"""spectral_jax: spectral state space models (STU) in JAX / Flax NNX, distilled to linear
dynamical systems (SpectraLDS) for constant-time generation.

Floors, lowest first (a floor never imports from a higher one; nothing heavy is imported here):

* :mod:`spectral_jax.ops` -- pure math: filters, FFT convolution, the STU formula, LDS scans and
  steps (plain and float32 pairs), naive and FutureFill convolution decoding.
* :mod:`spectral_jax.distill` -- fit LDS banks to the filters, convert STU parameters.
* :mod:`spectral_jax.nn` -- ``STU``, ``LDSLayer``, attention, blocks, ``SpectralModel``, and
  ``nn.distillation.distill_model`` (a model's STUs to LDS layers, with per-bank reports).
* :mod:`spectral_jax.generate` -- prefill and decode loops, sampling.
* :mod:`spectral_jax.data` -- tokenizers, token shards on disk, ``prepare-data``.
* :mod:`spectral_jax.train` -- tasks, sharding, optimizer, checkpoints, the training loop.
* :mod:`spectral_jax.inference`, :mod:`spectral_jax.cli`, :mod:`spectral_jax.demo` -- apps.
"""
