"""Decode-speed benchmark: naive vs FutureFill vs distilled LDS, layers and models, in one run.

Layer mode, the SpectraLDS paper's layer-speed setup: one convolution-only STU layer
(d_in = d_out = 128, K = 24, standard variant, tensordot, no AR terms), batch 1, float32, on the
local CPU. For N = 2^10 .. 2^20 it generates N tokens one at a time, feeding each output back
(``x_{t+1} = tanh(y_t)``), the whole loop one compiled ``lax.scan``. The LDS layer uses the
default arithmetic of :meth:`LDSLayer.from_stu` unless ``--lds-arithmetic`` says otherwise.

Model mode: 4-layer models (d_model 128, K = 24, vocab 256), STU-only (``S``) and hybrid (``SA``,
attention window 128), tensordot and full projections, batch 1 and 16. For each context (1k, 8k,
32k, 128k; 2^20 for LDS only, whose layers have no length limit, for the headline model, which fits
in memory there) it prefills a random prompt, then decodes ``--new`` tokens (default 8192: two
FutureFill epochs, so its FFT refreshes are timed) greedily with each strategy (``lds`` =
:func:`distill_model`). Per row: decode tokens/s (all rows of the batch counted; median of
``--repeats`` runs), prefill seconds (second call), compile seconds of the decode loop (first call
minus a timed one) and cache bytes per sequence. The headline, listed first, is the 4-layer
STU-only tensordot model at batch 1. A (model, batch, strategy) stops at the first context whose
predicted time (last time x max(growth, 2)) exceeds ``--budget`` seconds, or when it cannot run the
context (``skipped`` in the log).

Writes JSON (``--json``) with ``{"rows": [{"mode", "strategy", "context", "tokens", "seconds",
"tokens_per_second", "prefill_seconds", "compile_seconds", "cache_bytes", "model", "batch"}],
"meta": {...}}`` and a PNG of tokens/s against context (``--plot``, default next to the JSON).

Usage: python experiments/bench_decode.py [--quick] [--json PATH] [--plot PATH] [--budget S]
       [--modes layer model] [--strategies ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.atomic_files import write_atomic, write_json_atomic
from spectral_jax.decode import generate as gen
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.mixer import DecodeOptions
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
    """Seconds to generate ``n`` tokens one at a time with ``layer`` (compiled ahead of time; the
    best of several runs when ``n`` is small)."""
    # the LDS layer has no decode options: it steps its recurrence whatever they say
    options = DecodeOptions("futurefill" if strategy == "lds" else strategy)
    cache = layer.init_cache(1, n, jnp.float32, options)
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
    times = []
    for _ in range(max(1, LAYER_TOKENS_TIMED // n)):  # short runs repeated: timer noise
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(state, cache, x0))
        times.append(time.perf_counter() - start)
    seconds = min(times)
    if not bool(jnp.all(jnp.isfinite(out))):
        raise RuntimeError(f"{strategy} produced non-finite outputs at N={n}")
    return seconds


LAYER_TOKENS_TIMED = 2**15  # runs of fewer tokens are repeated until about this many, best kept


def predicted_seconds(past: list[float]) -> float:
    """The next run's predicted seconds from the previous ones (at least doubling)."""
    if len(past) >= 2:
        return past[-1] * max(past[-1] / past[-2], 2.0)
    return past[-1] * 4.0 if past else 0.0


def bench_layer(
    exponents: range,
    budget: float,
    arithmetic: str | None,
    strategies: tuple[str, ...],
    record: Callable[[dict], None],
) -> dict:
    """Layer-mode rows, each passed to ``record`` as it is measured; returns the meta."""
    max_len = 2 ** exponents[-1]
    cfg = STUConfig(d_in=D, d_out=D, max_len=max_len, num_filters=K, projection="tensordot")
    stu = STU(cfg, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    kwargs = {} if arithmetic is None else {"arithmetic": arithmetic}
    lds_layer = LDSLayer.from_stu(stu, **kwargs) if "lds" in strategies else None
    distill_s = time.perf_counter() - start
    layers = {"naive": stu, "futurefill": stu, "lds": lds_layer}
    history = {s: [] for s in strategies}
    for e in exponents:
        n = 2**e
        for strategy in strategies:
            past = history[strategy]
            if past is None:
                continue
            predicted = predicted_seconds(past)
            if predicted > budget:
                print(f"  {strategy:>10}  N=2^{e}: skipped (predicted {predicted:.0f} s)")
                history[strategy] = None
                continue
            seconds = time_layer_decode(layers[strategy], n, strategy)
            past.append(seconds)
            row = {
                "mode": "layer",
                "strategy": strategy,
                "context": n,
                "tokens": n,
                "seconds": seconds,
                "tokens_per_second": n / seconds,
                "prefill_seconds": None,
                "compile_seconds": None,
                "cache_bytes": None,
                "model": None,
                "batch": 1,
            }
            record(row)
            print(
                f"  {strategy:>10}  N=2^{e:<2}  {seconds:9.3f} s  {1e6 * seconds / n:9.1f} us/tok"
            )
    meta = {
        "layer": f"STU d_in=d_out={D} K={K} standard tensordot, no AR; batch 1 float32",
        "lds": f"LDSLayer.from_stu, {arithmetic or 'default'} arithmetic, default states",
        "lds_distill_seconds": distill_s,
        "budget_seconds": budget,
    }
    return meta


def summarize_layer(rows: list[dict]) -> None:
    by = {(r["strategy"], r["tokens"]): dict(r, us_per_token=1e6 / r["tokens_per_second"])
          for r in rows}  # fmt: skip
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
        print(f"lds at 2^20: {by[('lds', 2**20)]['seconds']:.2f} s (goal <= 6 s)")
    if ("lds", 2**15) in by and ("naive", 2**15) in by:
        ratio = by[("naive", 2**15)]["seconds"] / by[("lds", 2**15)]["seconds"]
        print(f"naive / lds at 2^15: {ratio:.1f}x (goal >= 20x)")


def summarize_model(rows: list[dict]) -> None:
    """Ratios of the issue's goals for each model at each batch: LDS against FutureFill and
    naive, its tokens/s spread over contexts, and its prefill against the STU's."""
    by = {(r["model"], r["batch"], r["strategy"], r["context"]): r for r in rows}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        lds = {c: r for (m, b, s, c), r in by.items() if (m, b, s) == (model, batch, "lds")}
        if not lds:
            continue
        print(f"\n{model} batch {batch}:")
        for context, row in sorted(lds.items()):
            cells = [f"lds {row['tokens_per_second']:9.1f} tok/s"]
            for other in ("futurefill", "naive"):
                if (model, batch, other, context) in by:
                    ratio = (
                        row["tokens_per_second"]
                        / by[(model, batch, other, context)]["tokens_per_second"]
                    )
                    cells.append(f"{ratio:6.1f}x {other}")
            stu = by.get((model, batch, "futurefill", context))
            if stu is not None:
                ratio = row["prefill_seconds"] / stu["prefill_seconds"]
                cells.append(f"prefill {ratio:.2f}x the STU's")
            print(f"  ctx {context:>8}: " + ", ".join(cells))
        rates = [r["tokens_per_second"] for r in lds.values()]
        mid = statistics.median(rates)
        spread = max(abs(r / mid - 1) for r in rates)
        print(f"  lds tokens/s within +-{100 * spread:.0f}% of the median {mid:.0f} (goal +-25%)")


MODELS = {  # name: (layer pattern, projection); the headline first
    "stu_tensordot": ("S", "tensordot"),
    "stu_full": ("S", "full"),
    "hybrid_tensordot": ("SA", "tensordot"),
    "hybrid_full": ("SA", "full"),
}


def cache_bytes_per_sequence(cache, batch: int) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache)) // batch


def time_model(model, prompt, new_tokens, repeats, options) -> dict:
    """Prefill ``prompt [B, L]`` and decode ``new_tokens``: timings and cache size."""
    logits, cache = jax.block_until_ready(gen.prefill(model, prompt, options))  # compiles
    start = time.perf_counter()
    jax.block_until_ready(gen.prefill(model, prompt, options))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(gen.decode(model, cache, logits, new_tokens))  # compiles
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(gen.decode(model, cache, logits, new_tokens))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_second": prompt.shape[0] * new_tokens / seconds,
        "prefill_seconds": prefill_s,
        "compile_seconds": max(first - seconds, 0.0),
        "cache_bytes": cache_bytes_per_sequence(cache, prompt.shape[0]),
    }


def bench_model(
    models: list[str],
    batches: list[int],
    contexts: list[int],
    lds_contexts: dict[tuple[str, int], list[int]],
    new_tokens: int,
    repeats: int,
    budget: float,
    arithmetic: str | None,
    strategies: tuple[str, ...],
    record: Callable[[dict], None],
) -> dict:
    """Model-mode rows, each passed to ``record`` as it is measured; returns the meta."""
    max_len = max(contexts) + new_tokens  # the STU filters' length; LDS layers have no limit
    epoch = default_block_len("futurefill", max_len)
    if new_tokens < 2 * epoch:
        print(f"note: {new_tokens} new tokens span under two FutureFill epochs of {epoch}")
    kwargs = {} if arithmetic is None else {"arithmetic": arithmetic}
    distill_s = {}
    for name in models:
        pattern, projection = MODELS[name]
        config = ModelConfig(
            d_model=D, num_layers=4, max_len=max_len, vocab_size=256, num_filters=K,
            layer_pattern=pattern, stu_projection=projection,
        )  # fmt: skip
        model = SpectralModel(config, rngs=nnx.Rngs(0))
        start = time.perf_counter()
        distilled = distill_model(model, **kwargs).model if "lds" in strategies else None
        distill_s[name] = time.perf_counter() - start
        for batch in batches:
            for strategy in strategies:
                m = distilled if strategy == "lds" else model
                options = DecodeOptions("futurefill" if strategy == "lds" else strategy)
                past: list[float] = []
                extra = lds_contexts.get((name, batch), []) if strategy == "lds" else []
                for context in contexts + extra:
                    tag = f"  {name:>16} B={batch:<3} ctx {context:>8}  {strategy:>10}"
                    if predicted_seconds(past) > budget:  # all calls at this context
                        print(f"{tag}  skipped (predicted over the {budget:.0f} s budget)")
                        break
                    key = jax.random.key(context)
                    prompt = jax.random.randint(key, (batch, context), 0, 256, jnp.int32)
                    start = time.perf_counter()
                    try:
                        timing = time_model(m, prompt, new_tokens, repeats, options)
                    except ValueError as err:  # a layer that cannot run this context
                        print(f"{tag}  skipped: {err}")
                        break
                    except jax.errors.JaxRuntimeError as err:  # e.g. out of memory
                        print(f"{tag}  skipped: {str(err).splitlines()[0]}")
                        break
                    past.append(time.perf_counter() - start)
                    row = {"mode": "model", "strategy": strategy, "context": context,
                           "tokens": new_tokens, **timing, "model": name,
                           "batch": batch}  # fmt: skip
                    record(row)
                    print(f"{tag}  {row['tokens_per_second']:10.1f} tok/s  prefill "
                          f"{row['prefill_seconds']:.3f} s  compile {row['compile_seconds']:.2f} s"
                          f"  cache {row['cache_bytes'] / 2**20:.2f} MiB/seq")  # fmt: skip
    meta = {
        "models": {
            n: f"4 x {MODELS[n][0]} layers, d_model {D}, K {K}, {MODELS[n][1]}, vocab 256"
            for n in models
        },
        "model_max_len": max_len,
        "lds_model": f"distill_model(model), {arithmetic or 'default'} arithmetic",
        "lds_distill_seconds": distill_s,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "futurefill_epoch": epoch,
    }
    return meta


def plot(rows: list[dict], path: Path) -> None:
    """tokens/s against context: layer mode, and the headline model at batch 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [
        (axes[0], "layer", None, "one layer (d=128, K=24, tensordot), batch 1"),
        (axes[1], "model", next(iter(MODELS)), "4-layer STU-only tensordot model, batch 1"),
    ]
    for ax, mode, model, title in panels:
        for strategy in STRATEGIES:
            pts = sorted(
                (r["context"], r["tokens_per_second"])
                for r in rows
                if r["mode"] == mode and r["strategy"] == strategy and r["model"] == model
                and r["batch"] == 1
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument(
        "--modes", nargs="+", choices=("layer", "model"), default=["layer", "model"]
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="PNG of tokens/s (default: beside --json)")
    parser.add_argument("--budget", type=float, default=60.0, help="max seconds per run")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--new", type=int, default=None, help="model mode: tokens to decode")
    parser.add_argument("--repeats", type=int, default=3, help="model mode: timed runs")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="model mode"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="model mode")
    parser.add_argument(
        "--lds-arithmetic", choices=ARITHMETICS, default=None, help="default: the layer's"
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    print(f"load before: {load()}")
    strategies = tuple(args.strategies)
    meta = {"quick": args.quick}
    layer_rows, model_rows = [], []

    def record(row: dict, final: bool = False) -> None:
        """Keep ``row`` and rewrite the JSON (headline model rows first), so that a run cut
        short keeps what it measured (``meta.partial``)."""
        if row:
            (model_rows if row["mode"] == "model" else layer_rows).append(row)
        if args.json:
            payload = {"rows": model_rows + layer_rows, "meta": {**meta, "partial": not final}}
            write_json_atomic(args.json, payload)

    if "layer" in args.modes:  # run first, on a fresh process: its per-token times are small
        exponents = range(10, 12) if args.quick else range(10, 21)
        meta["layer"] = bench_layer(exponents, args.budget, args.lds_arithmetic, strategies, record)
        summarize_layer(layer_rows)
    if "model" in args.modes:
        if args.quick:  # one small model, one context: checks the path, `make bench` runs it
            models, batches, contexts, lds_contexts = ["stu_tensordot"], [1], [256], {}
        else:
            models, batches = args.models, args.batches
            contexts = [1024, 8192, 32768, 131072]
            # A 2^20 prompt holds [B, 2^20, d_model] activations (and attention scores over its
            # windows): the headline model at batch 1 fits in this machine's memory (~12 GiB
            # peak); a full-projection layer's FFT prefill is ~40x a tensordot one's.
            lds_contexts = {("stu_tensordot", 1): [2**20]}
        new = args.new or (64 if args.quick else 8192)
        meta["model"] = bench_model(
            models, batches, contexts, lds_contexts, new, args.repeats, args.budget,
            args.lds_arithmetic, strategies, record,
        )  # fmt: skip
        summarize_model(model_rows)
    meta.update(jax=jax.__version__, device=str(jax.devices()[0]), load_after=load())
    print(f"load after: {meta['load_after']}")
    record({}, final=True)
    if args.json:
        print(f"wrote {args.json}")
    rows = model_rows + layer_rows
    png = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(rows, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
