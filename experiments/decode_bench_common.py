"""What the decode benchmarks share: ``bench_decode_layer.py``, ``bench_decode_model.py``,
``bench_decode.py`` (both in one run) and ``bench_decode_batch.py`` (its own JSON; it uses
:func:`time_decode` and :func:`load`). Each script but the last is a list of :class:`Mode` handed to
:func:`main`, which parses the shared flags, rewrites the JSON after every row and draws one plot
panel per mode (``from decode_bench_common import ...``: the scripts run as
``python experiments/NAME.py``, so this folder is on the path).

JSON: ``{"rows": [{"mode", "strategy", "context", "tokens", "seconds", "tokens_per_second",
"prefill_seconds", "compile_seconds", "cache_bytes", "model", "batch", "horizon"}], "meta":
{...}}``, model rows (headline first) before layer rows; ``horizon`` is the memory horizon the
LDS layers were distilled under (``"none"``: the plain LDS; also for the STU strategies and every
layer row); ``meta.partial`` is true until the run ends. The plot draws the plain rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax

from spectral_jax.atomic_files import write_atomic, write_json_atomic
from spectral_jax.validation import ARITHMETICS, GENERATION_STRATEGIES

D, K = 128, 24  # width and filters of every benchmarked STU
JSON_ORDER = ("model", "layer")  # the headline model rows first

Record = Callable[[dict], None]


class Mode(NamedTuple):
    """One benchmark mode.

    name: the rows' ``mode``; also the key of its meta.
    bench: ``bench(args, record) -> meta``: passes each row to ``record`` as it is measured and
      prints a summary at the end.
    panel: ``(model, title)`` of its plot panel: batch-1 rows of that ``model`` (None: layer).
    add_arguments: its own flags, if any.
    """

    name: str
    bench: Callable[[argparse.Namespace, Record], dict]
    panel: tuple[str | None, str]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def load() -> str:
    """The machine's 1/5/15-minute load averages, to report next to the timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def cache_bytes_per_sequence(cache, batch: int) -> int:
    """Bytes of a decode cache pytree (every leaf) per sequence of its ``batch``."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache)) // batch


def time_decode(prefill: Callable, decode: Callable, prompt, new_tokens: int, repeats: int) -> dict:
    """Time one model's decode: ``prefill(prompt [B, L]) -> (last logits [B, V], cache)`` and
    ``decode(cache, logits, new_tokens) -> tokens [B, new_tokens]`` (one compiled loop).

    Returns seconds (median of ``repeats`` decode runs after a compiling one), tokens/s (all
    rows counted), prefill seconds (second call), compile seconds of the decode loop (first
    call minus the median) and cache bytes per sequence."""
    logits, cache = jax.block_until_ready(prefill(prompt))  # compiles
    start = time.perf_counter()
    jax.block_until_ready(prefill(prompt))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(decode(cache, logits, new_tokens))  # compiles
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(decode(cache, logits, new_tokens))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_second": prompt.shape[0] * new_tokens / seconds,
        "prefill_seconds": prefill_s,
        "compile_seconds": max(first - seconds, 0.0),
        "cache_bytes": cache_bytes_per_sequence(cache, prompt.shape[0]),
    }


def predicted_seconds(past: list[float]) -> float:
    """The next run's predicted seconds from the previous ones (at least doubling)."""
    if len(past) >= 2:
        return past[-1] * max(past[-1] / past[-2], 2.0)
    return past[-1] * 4.0 if past else 0.0


def lds_arithmetic(args: argparse.Namespace) -> dict:
    """The distillation's ``arithmetic`` keyword from ``--lds-arithmetic`` (none: the default)."""
    return {} if args.lds_arithmetic is None else {"arithmetic": args.lds_arithmetic}


def plot(rows: list[dict], path: Path, modes: list[Mode]) -> None:
    """tokens/s against context, one panel per mode (its batch-1 rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        model, title = mode.panel
        for strategy in GENERATION_STRATEGIES:
            pts = sorted(
                (r["context"], r["tokens_per_second"])
                for r in rows
                if r["mode"] == mode.name and r["strategy"] == strategy and r["model"] == model
                and r["batch"] == 1 and r["horizon"] == "none"
            )  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=strategy)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main(doc: str, modes: list[Mode]) -> None:
    """Parse the flags (the shared ones and each mode's), run ``modes`` in order, write the
    JSON (``--json``, rewritten after every row so that a run cut short keeps what it measured)
    and the plot (``--plot``, default beside the JSON)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the path)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="PNG of tokens/s (default: beside --json)")
    parser.add_argument("--budget", type=float, default=60.0, help="max seconds per run")
    parser.add_argument(
        "--strategies", nargs="+", choices=GENERATION_STRATEGIES, default=GENERATION_STRATEGIES
    )
    parser.add_argument(
        "--lds-arithmetic", choices=ARITHMETICS, default=None, help="default: the layer's"
    )
    for mode in modes:
        if mode.add_arguments is not None:
            mode.add_arguments(parser)
    args = parser.parse_args()
    args.strategies = tuple(args.strategies)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    print(f"load before: {load()}")
    meta: dict = {"quick": args.quick}
    rows: dict[str, list[dict]] = {name: [] for name in JSON_ORDER}

    def ordered() -> list[dict]:
        return [row for name in JSON_ORDER for row in rows[name]]

    def record(row: dict, final: bool = False) -> None:
        if row:
            rows[row["mode"]].append(row)
        if args.json:
            write_json_atomic(
                args.json, {"rows": ordered(), "meta": {**meta, "partial": not final}}
            )

    for mode in modes:
        meta[mode.name] = mode.bench(args, record)
    meta.update(jax=jax.__version__, device=str(jax.devices()[0]), load_after=load())
    print(f"load after: {meta['load_after']}")
    record({}, final=True)
    if args.json:
        print(f"wrote {args.json}")
    png = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(ordered(), png, modes)
        print(f"wrote {png}")
