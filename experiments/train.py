"""Train a named run: ``python experiments/train.py PRESET [--set key=value ...]``.

The same as ``spectral-jax train``; presets and override keys are documented in
:mod:`spectral_jax.train.presets` (``--help`` prints them). Launch notes for TPU pod slices are
in ``experiments/tpu/README.md``.
"""

import sys

from spectral_jax.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
