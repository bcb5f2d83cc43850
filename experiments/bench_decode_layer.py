"""Decode speed of one layer: naive vs FutureFill vs distilled LDS, the SpectraLDS paper's setup.

One convolution-only STU layer (d_in = d_out = 128, K = 24, standard variant, tensordot, no AR
terms), batch 1, float32, on the local device. For N = 2^10 .. 2^20 (2^11 with ``--quick``,
2^E for each E of ``--exponents``) it generates N tokens one at a time, feeding each output
back (``x_{t+1} = tanh(y_t)``), the whole loop one compiled ``lax.scan``. The LDS layer is
:meth:`LDSLayer.from_stu` in its default arithmetic unless ``--lds-arithmetic`` says otherwise.
A strategy stops at the first N whose predicted time (last time x max(growth, 2)) exceeds
``--budget`` seconds.

Rows and JSON: see :mod:`decode_bench_common` (``mode`` ``"layer"``, ``tokens = context = N``).

Usage: python experiments/bench_decode_layer.py [--quick] [--json PATH] [--plot PATH]
       [--budget S] [--strategies ...] [--lds-arithmetic plain|compensated] [--exponents E ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from decode_bench_common import D, K, Mode, Record, lds_arithmetic, main, predicted_seconds
from flax import nnx

from spectral_jax.decode.strategy import DecodePlan, decode_plan
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.validation import GENERATION_STRATEGIES

TOKENS_TIMED = 2**15  # runs of fewer tokens are repeated until about this many, best kept


def time_layer_decode(plan: DecodePlan, n: int, strategy: str) -> float:
    """Seconds to generate ``n`` tokens one at a time with ``plan.model`` (compiled ahead of
    time; the best of several runs when ``n`` is small)."""
    cache = plan.model.init_cache(1, n, jnp.float32, plan.options)
    graphdef, state = nnx.split(plan.model)
    x0 = jnp.full((1, D), 0.1, jnp.float32)

    def run(state, cache, x0):
        m = nnx.merge(graphdef, state)

        def advance(carry, _):
            cache, x = carry
            cache, y = m.step(cache, x)
            return (cache, jnp.tanh(y)), None

        (_, x), _ = jax.lax.scan(advance, (cache, x0), None, length=n)
        return x

    compiled = jax.jit(run).lower(state, cache, x0).compile()
    jax.block_until_ready(cache)
    times = []
    for _ in range(max(1, TOKENS_TIMED // n)):  # short runs repeated: timer noise
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(state, cache, x0))
        times.append(time.perf_counter() - start)
    if not bool(jnp.all(jnp.isfinite(out))):
        raise RuntimeError(f"{strategy} produced non-finite outputs at N={n}")
    return min(times)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exponents", nargs="+", type=int, metavar="E", help="layer mode: N = 2^E for each E"
    )


def bench(args: argparse.Namespace, record: Record) -> dict:
    """Layer rows, each passed to ``record`` as it is measured; prints the summary, returns the
    meta."""
    exponents = args.exponents or (range(10, 12) if args.quick else range(10, 21))
    cfg = STUConfig(
        d_in=D, d_out=D, max_len=2 ** exponents[-1], num_filters=K, projection="tensordot"
    )
    stu = STU(cfg, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    lds = LDSLayer.from_stu(stu, **lds_arithmetic(args)) if "lds" in args.strategies else None
    distill_s = time.perf_counter() - start
    plans = {s: decode_plan(stu, s, distilled=lds) for s in args.strategies}
    history: dict[str, list[float] | None] = {s: [] for s in args.strategies}
    rows = []
    for e in exponents:
        n = 2**e
        for strategy, plan in plans.items():
            past = history[strategy]
            if past is None:
                continue
            predicted = predicted_seconds(past)
            if predicted > args.budget:
                print(f"  {strategy:>10}  N=2^{e}: skipped (predicted {predicted:.0f} s)")
                history[strategy] = None
                continue
            seconds = time_layer_decode(plan, n, strategy)
            past.append(seconds)
            row = {"mode": "layer", "strategy": strategy, "context": n, "tokens": n,
                   "seconds": seconds, "tokens_per_second": n / seconds, "prefill_seconds": None,
                   "compile_seconds": None, "cache_bytes": None, "model": None,
                   "batch": 1, "horizon": "none"}  # fmt: skip
            rows.append(row)
            record(row)
            print(
                f"  {strategy:>10}  N=2^{e:<2}  {seconds:9.3f} s  {1e6 * seconds / n:9.1f} us/tok"
            )
    summarize(rows)
    return {
        "layer": f"STU d_in=d_out={D} K={K} standard tensordot, no AR; batch 1 float32",
        "lds": f"LDSLayer.from_stu, {args.lds_arithmetic or 'default'} arithmetic, default states",
        "lds_distill_seconds": distill_s,
        "budget_seconds": args.budget,
    }


def summarize(rows: list[dict]) -> None:
    """us/token per strategy and N, naive and FutureFill against LDS, and the LDS spread."""
    by = {(r["strategy"], r["tokens"]): dict(r, us_per_token=1e6 / r["tokens_per_second"])
          for r in rows}  # fmt: skip
    print(
        "\nN        " + "".join(f"{s:>14}" for s in GENERATION_STRATEGIES) + "   naive/lds  ff/lds"
    )
    for n in sorted({r["tokens"] for r in rows}):
        cells = [by.get((s, n)) for s in GENERATION_STRATEGIES]
        text = "".join(f"{c['us_per_token']:11.1f} us" if c else f"{'-':>14}" for c in cells)
        ratios = [
            f"{by[(s, n)]['seconds'] / by[('lds', n)]['seconds']:9.1f}x"
            if (s, n) in by and ("lds", n) in by
            else f"{'-':>10}"
            for s in ("naive", "futurefill")
        ]
        print(f"2^{n.bit_length() - 1:<6} {text} {''.join(ratios)}")
    lds = [by[k] for k in sorted(by) if k[0] == "lds"]
    if not lds:
        return
    per_token = [r["us_per_token"] for r in lds]
    mid = statistics.median(per_token)
    spread = max(abs(p / mid - 1) for p in per_token)
    print(f"\nlds us/token from 2^{lds[0]['tokens'].bit_length() - 1} to "
          f"2^{lds[-1]['tokens'].bit_length() - 1}: within +-{100 * spread:.0f}% of the median "
          f"{mid:.1f}")  # fmt: skip
    if ("lds", 2**20) in by:
        print(f"lds at 2^20: {by[('lds', 2**20)]['seconds']:.2f} s")
    if ("lds", 2**15) in by and ("naive", 2**15) in by:
        ratio = by[("naive", 2**15)]["seconds"] / by[("lds", 2**15)]["seconds"]
        print(f"naive / lds at 2^15: {ratio:.1f}x")


MODE = Mode(
    "layer",
    bench,
    panel=(None, "one layer (d=128, K=24, tensordot), batch 1"),
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    main(__doc__, [MODE])
