"""Flax NNX modules: thin shells over the pure functions of :mod:`spectral_jax`."""
