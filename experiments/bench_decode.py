"""Decode-speed benchmark: naive vs FutureFill vs distilled LDS, in one run.

Layer mode (default), the SpectraLDS paper's layer-speed setup: one convolution-only STU layer
(d_in = d_out = 128, K = 24, standard variant, tensordot, no AR terms), batch 1, float32, on the
local CPU. For N = 2^10 .. 2^20 it generates N tokens one at a time, feeding each output back
(``x_{t+1} = tanh(y_t)``), the whole loop one compiled ``lax.scan``; it reports total seconds
and microseconds per token per strategy. A strategy stops at the first N whose predicted time
(last time x last growth ratio) exceeds ``--budget`` seconds (default 60). Compilation and
cache construction are not timed; the LDS distillation is timed separately.

Model mode (``--model``): a 4-layer STU model (d_model 128, K = 24, tensordot, vocab 256);
for contexts of 1k, 8k and 32k tokens it prefills a random prompt, then decodes ``--new``
tokens greedily with each strategy (``lds`` = :func:`distill_model`); tokens/s of the decode
loop (median of ``--repeats`` runs after a warm-up) and the prefill time. The default ``--new``
(3072; 512 with --quick) spans several FutureFill epochs, so the timing includes FFT refreshes
(prefill computes the first epoch's block: a window within one epoch would time no FFT at all).

Usage: python experiments/bench_decode.py [--quick] [--model] [--json PATH] [--budget S]
JSON: {"rows": [{"strategy", "tokens", "seconds", ...}], "meta": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax import generate as gen
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.ops.conv_decode import default_block_len
from spectral_jax.validation import ARITHMETICS

D, K = 128, 24
STRATEGIES = ("naive", "futurefill", "lds")


def load() -> str:
    """The machine's 1/5/15-minute load averages, to report next to the timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def time_layer_decode(layer, n: int, strategy: str) -> float:
    """Seconds to generate ``n`` tokens one at a time with ``layer`` (compiled ahead of time)."""
    if strategy == "lds":
        cache = layer.init_cache(1, n, jnp.float32)
    else:
        cache = layer.init_cache(1, n, jnp.float32, strategy=strategy)
    graphdef, state = nnx.split(layer)
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
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(state, cache, x0))
    seconds = time.perf_counter() - start
    if not bool(jnp.all(jnp.isfinite(out))):
        raise RuntimeError(f"{strategy} produced non-finite outputs at N={n}")
    return seconds


def bench_layer(
    exponents: range, budget: float, arithmetic: str, strategies: tuple[str, ...]
) -> tuple[list[dict], dict]:
    max_len = 2 ** exponents[-1]
    cfg = STUConfig(d_in=D, d_out=D, max_len=max_len, num_filters=K, projection="tensordot")
    stu = STU(cfg, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    lds_layer = LDSLayer.from_stu(stu, arithmetic=arithmetic) if "lds" in strategies else None
    distill_s = time.perf_counter() - start
    layers = {"naive": stu, "futurefill": stu, "lds": lds_layer}
    rows, history = [], {s: [] for s in strategies}
    for e in exponents:
        n = 2**e
        for strategy in strategies:
            past = history[strategy]
            if past is None:
                continue
            if len(past) >= 2:
                predicted = past[-1] * max(past[-1] / past[-2], 2.0)
            else:
                predicted = past[-1] * 4.0 if past else 0.0
            if predicted > budget:
                print(f"  {strategy:>10}  N=2^{e}: skipped (predicted {predicted:.0f} s)")
                history[strategy] = None
                continue
            seconds = time_layer_decode(layers[strategy], n, strategy)
            past.append(seconds)
            row = {
                "strategy": strategy,
                "tokens": n,
                "seconds": seconds,
                "us_per_token": 1e6 * seconds / n,
            }
            rows.append(row)
            print(
                f"  {strategy:>10}  N=2^{e:<2}  {seconds:9.3f} s  {row['us_per_token']:9.1f} us/tok"
            )
    meta = {
        "mode": "layer",
        "layer": f"STU d_in=d_out={D} K={K} standard tensordot, no AR; batch 1 float32",
        "lds": f"LDSLayer.from_stu, {arithmetic} arithmetic, default number of states",
        "lds_distill_seconds": distill_s,
        "budget_seconds": budget,
    }
    return rows, meta


def summarize_layer(rows: list[dict]) -> None:
    by = {(r["strategy"], r["tokens"]): r for r in rows}
    print("\nN        " + "".join(f"{s:>14}" for s in STRATEGIES) + "   naive/lds  ff/lds")
    for n in sorted({r["tokens"] for r in rows}):
        cells = [by.get((s, n)) for s in STRATEGIES]
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
          f"{mid:.1f} (goal +-25%)")  # fmt: skip
    if ("lds", 2**20) in by:
        print(f"lds at 2^20: {by[('lds', 2**20)]['seconds']:.2f} s (goal <= 10 s)")
    if ("lds", 2**15) in by and ("naive", 2**15) in by:
        ratio = by[("naive", 2**15)]["seconds"] / by[("lds", 2**15)]["seconds"]
        print(f"naive / lds at 2^15: {ratio:.1f}x (goal >= 20x)")


def bench_model(
    contexts: list[int],
    new_tokens: int,
    repeats: int,
    arithmetic: str,
    strategies: tuple[str, ...],
) -> tuple[list[dict], dict]:
    config = ModelConfig(
        d_model=D, num_layers=4, max_len=max(contexts) + new_tokens, vocab_size=256,
        num_filters=K, stu_projection="tensordot",
    )  # fmt: skip
    model = SpectralModel(config, rngs=nnx.Rngs(0))
    epoch = default_block_len("futurefill", config.max_len)
    if new_tokens <= epoch:
        print(f"note: {new_tokens} new tokens fit in one FutureFill epoch ({epoch}): no FFT timed")
    start = time.perf_counter()
    distilled = distill_model(model, arithmetic=arithmetic).model if "lds" in strategies else None
    distill_s = time.perf_counter() - start
    rows = []
    for context in contexts:
        prompt = jax.random.randint(jax.random.key(context), (1, context), 0, 256, jnp.int32)
        for strategy in strategies:
            m, kind = (distilled, None) if strategy == "lds" else (model, strategy)
            logits, cache = jax.block_until_ready(gen.prefill(m, prompt, strategy=kind))
            start = time.perf_counter()
            jax.block_until_ready(gen.prefill(m, prompt, strategy=kind))
            prefill_s = time.perf_counter() - start
            jax.block_until_ready(gen.decode(m, cache, logits, new_tokens))  # compile
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(gen.decode(m, cache, logits, new_tokens))
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            row = {
                "strategy": strategy,
                "tokens": new_tokens,
                "seconds": seconds,
                "context": context,
                "tokens_per_second": new_tokens / seconds,
                "prefill_seconds": prefill_s,
            }
            rows.append(row)
            print(f"  ctx {context:>6}  {strategy:>10}  {row['tokens_per_second']:9.1f} tok/s  "
                  f"(prefill {prefill_s:.3f} s)")  # fmt: skip
    meta = {
        "mode": "model",
        "model": "SpectralModel 4 x STU (d_model 128, K 24, tensordot), vocab 256, batch 1",
        "lds": f"distill_model(model), {arithmetic} arithmetic, default number of states",
        "lds_distill_seconds": distill_s,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "futurefill_epoch": epoch,
    }
    return rows, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument("--model", action="store_true", help="end-to-end 4-layer model")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--budget", type=float, default=60.0, help="max seconds per run")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--new", type=int, default=None, help="model mode: tokens to decode")
    parser.add_argument("--repeats", type=int, default=3, help="model mode: timed runs")
    parser.add_argument(
        "--lds-arithmetic", choices=ARITHMETICS, default="plain", help="LDS layer arithmetic"
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    print(f"load before: {load()}")
    if args.model:
        contexts = [256, 1024] if args.quick else [1024, 8192, 32768]
        new = args.new or (512 if args.quick else 3072)
        rows, meta = bench_model(
            contexts, new, args.repeats, args.lds_arithmetic, tuple(args.strategies)
        )
    else:
        exponents = range(10, 14) if args.quick else range(10, 21)
        rows, meta = bench_layer(
            exponents, args.budget, args.lds_arithmetic, tuple(args.strategies)
        )
        summarize_layer(rows)
    meta.update(jax=jax.__version__, device=str(jax.devices()[0]), load_after=load())
    print(f"load after: {meta['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
