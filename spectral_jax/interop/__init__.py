"""Other frameworks' checkpoints: :mod:`~spectral_jax.interop.flashstu` (hazan-lab/flash-stu-2)."""
