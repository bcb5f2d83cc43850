"""Both decode benchmarks in one run, into one JSON and one plot: ``bench_decode_layer.py``
first (on a fresh process: its per-token times are small), then ``bench_decode_model.py``.

Flags: the union of theirs (see their docstrings); rows and JSON: :mod:`decode_bench_common`.

Usage: python experiments/bench_decode.py [--quick] [--json PATH] [--plot PATH] [--budget S]
       [--strategies ...] [--models ...] [--batches ...] [--new N] [--repeats R]
"""

from __future__ import annotations

import bench_decode_layer
import bench_decode_model
from decode_bench_common import main

if __name__ == "__main__":
    main(__doc__, [bench_decode_layer.MODE, bench_decode_model.MODE])
