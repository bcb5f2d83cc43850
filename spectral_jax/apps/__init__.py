"""Apps on top of the library: inference checkpoints (load, distill, save), the ``spectral-jax``
command line, its streaming evaluation (``evaluate``), and the demo."""
