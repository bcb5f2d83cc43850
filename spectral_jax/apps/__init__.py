"""Apps on top of the library: inference checkpoints (load, distill, save), the ``spectral-jax``
command line, and the demo."""
