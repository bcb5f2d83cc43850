"""Decoding: prefill and decode loops, sampling, streaming evaluation, and the strategies.

- :mod:`~spectral_jax.decode.generate`: ``prefill``, ``decode``, ``generate`` (ragged batches, any
  length the layers allow);
- :mod:`~spectral_jax.decode.evaluate`: losses over long streams with the decode cache carried;
- :mod:`~spectral_jax.decode.strategy`: ``decode_plan``, a strategy name (naive, FutureFill,
  distilled LDS) turned into the model and ``DecodeOptions`` that decode it.
"""
