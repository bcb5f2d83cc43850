"""The one timing helper the benchmark scripts share (``from timing import median_seconds``:
the scripts run as ``python experiments/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs after one warm-up (compiling)
    run; every run waits for its results (``jax.block_until_ready``)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
