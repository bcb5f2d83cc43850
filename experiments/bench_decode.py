"""Both decode benchmarks in one run, into one JSON and one plot: ``bench_decode_layer.py``
first (on a fresh process: its per-token times are small), then ``bench_decode_model.py``.
Flags: the union of theirs (see their docstrings); rows and JSON: :mod:`decode_bench_common`.

``batch`` (the first argument) runs the batch sweep instead, into its own JSON and plot:
``bench_decode_batch.py`` (distilled models beside recurrentgemma's Griffin at batch 1 to 256,
each row against the machine's matmul limit; its docstring has the flags and the JSON).

Usage: python experiments/bench_decode.py [--quick] [--json PATH] [--plot PATH] [--budget S]
       [--strategies ...] [--models ...] [--batches ...] [--new N] [--repeats R]
       python experiments/bench_decode.py batch [--quick] [--json PATH] [--plot PATH]
       [--batches B ...] [--new N] [--prompt L] [--repeats R] [--models NAME ...]
"""

from __future__ import annotations

import sys

import bench_decode_batch
import bench_decode_layer
import bench_decode_model
from decode_bench_common import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["batch"]:
        bench_decode_batch.main(sys.argv[2:])
    else:
        main(__doc__, [bench_decode_layer.MODE, bench_decode_model.MODE])
