"""spectral_jax: spectral state space models (STU) in JAX / Flax NNX, distilled to linear
dynamical systems (SpectraLDS) for constant-time generation.

One folder per concept, lowest floor first (a floor never imports from a higher one; nothing
heavy is imported here):

* ``validation``, ``atomic_files`` -- typed choices and shared checks; files never half-written.
* :mod:`spectral_jax.ops` -- pure math: filters, FFT convolution, the STU formula, LDS scans and
  steps (plain and float32 pairs), naive and FutureFill convolution decoding.
* :mod:`spectral_jax.distill` -- the SpectraLDS fit: LDS banks, the fit, STU -> LDS parameters,
  the fit report.
* :mod:`spectral_jax.data` -- tokenizers, token shards, sources, ``prepare-data``, training tasks.
* :mod:`spectral_jax.nn` -- ``STU``, ``LDSLayer``, attention, blocks, ``SpectralModel``, and
  distilling a whole model.
* :mod:`spectral_jax.decode` -- prefill and decode loops, sampling, streaming evaluation, and the
  decoding strategies (naive, FutureFill, distilled LDS).
* :mod:`spectral_jax.train` -- config, presets, sharding, optimizer, checkpoints, the loop.
* :mod:`spectral_jax.apps` -- inference checkpoints, the ``spectral-jax`` CLI, the demo.

Shape notation, used by every docstring: arrays are written ``name: [dims]`` with these letters.

=========  =================================================================================
``B``      batch (sequences); ``b`` the rows of it that one process loads
``L``      a sequence's length; ``T`` a part of it (a block, a prompt); ``Lq``/``Lk`` of
           queries/keys
``D``      the model width (``d_model``); ``d_in``/``d_out`` a layer's input/output features;
           ``d_input``/``d_output`` a regression model's input/output features
``K``      spectral filters per branch; ``S`` branches (2: ``phi`` and ``(-1)^t phi``; 1 Hankel-L)
``F``      a convolution's channels: filter outputs ``S * K``, or filter mixtures
``n``      decays (states) per branch of an LDS bank; ``C`` channels that drive an LDS
``H``      attention heads; ``Dh`` the width of one; ``W`` the attention window
``M``      the hidden width of a gated MLP; ``V`` the vocabulary
=========  =================================================================================

``...`` stands for any leading dimensions, and ``*S`` for the shape of one state of an LDS
(e.g. ``C, S, n``).
"""
