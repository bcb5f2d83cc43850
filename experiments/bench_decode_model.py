"""Decode speed of whole models: naive vs FutureFill vs distilled LDS, prefill, compile, cache.

4-layer models (d_model 128, K = 24, vocab 256), STU-only (``S``) and hybrid (``SA``, attention
window 128), tensordot and full projections, batch 1 and 16. For each context (1k, 8k, 32k,
128k; 2^20 for LDS only, whose layers have no length limit, for the headline model, which fits
in memory there) it prefills a random prompt, then decodes ``--new`` tokens (default 8192: two
FutureFill epochs, so its FFT refreshes are timed) greedily with each strategy
(:func:`~spectral_jax.decode.strategy.decode_plan`; ``lds`` distills the model). Per row: decode
tokens/s (all rows of the batch counted; median of ``--repeats`` runs), prefill seconds (second
call), compile seconds of the decode loop (first call minus a timed one) and cache bytes per
sequence. The headline, listed first, is the 4-layer STU-only tensordot model at batch 1. A
(model, batch, strategy) stops at the first context whose predicted time (last time x
max(growth, 2)) exceeds ``--budget`` seconds, or when it cannot run the context (``skipped`` in
the log). ``--quick``: the headline model at batch 1, one context of 256, 64 new tokens.
``--lds-horizons none cap:0.001 restart:2 ...`` distills the ``lds`` rows under each memory
horizon (as ``spectral-jax distill --horizon`` does) and compares each with the plain one
(``none``) in the same run; ``--contexts`` picks the prompt lengths.

Rows and JSON: see :mod:`decode_bench_common` (``mode`` ``"model"``).

Usage: python experiments/bench_decode_model.py [--quick] [--json PATH] [--plot PATH]
       [--budget S] [--strategies ...] [--models ...] [--batches ...] [--new N] [--repeats R]
       [--contexts N ...] [--lds-horizons POLICY ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from decode_bench_common import (
    D,
    K,
    Mode,
    Record,
    lds_arithmetic,
    main,
    predicted_seconds,
    time_decode,
)
from flax import nnx

from spectral_jax.decode import generate as gen
from spectral_jax.decode.strategy import DecodePlan, decode_plan
from spectral_jax.nn.horizon import distill_under
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.ops.conv_decode import default_block_len

CONTEXTS = (1024, 8192, 32768, 131072)  # prompt lengths of a full run
MODELS = {  # name: (layer pattern, projection); the headline first
    "stu_tensordot": ("S", "tensordot"),
    "stu_full": ("S", "full"),
    "hybrid_tensordot": ("SA", "tensordot"),
    "hybrid_full": ("SA", "full"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new", type=int, default=None, help="model mode: tokens to decode")
    parser.add_argument("--repeats", type=int, default=3, help="model mode: timed runs")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="model mode"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="model mode")
    parser.add_argument(
        "--contexts", nargs="+", type=int, default=list(CONTEXTS), help="model mode: prompts"
    )
    parser.add_argument(
        "--lds-horizons", nargs="+", default=["none"],
        help="model mode: the lds rows' distillation horizons (as distill --horizon takes them)",
    )  # fmt: skip


def lds_plan(model: SpectralModel, horizon: str, args: argparse.Namespace) -> DecodePlan:
    """The ``lds`` plan of ``model`` distilled under ``horizon`` (``distill_under``)."""
    distilled = distill_under(model, horizon, **lds_arithmetic(args))
    return decode_plan(model, "lds", distilled=distilled)


def time_model(plan: DecodePlan, prompt, new_tokens: int, repeats: int) -> dict:
    """Prefill ``prompt [B, L]`` and decode ``new_tokens`` with ``plan``: timings and cache
    size (:func:`decode_bench_common.time_decode`)."""
    return time_decode(
        lambda p: gen.prefill(plan.model, p, plan.options),
        lambda cache, logits, n: gen.decode(plan.model, cache, logits, n),
        prompt,
        new_tokens,
        repeats,
    )


def bench(args: argparse.Namespace, record: Record) -> dict:
    """Model rows, each passed to ``record`` as it is measured; prints the summary, returns the
    meta."""
    if args.quick:  # one small model, one context: checks the path, `make bench` runs it
        models, batches, contexts, lds_contexts = ["stu_tensordot"], [1], [256], {}
    else:
        models, batches = args.models, args.batches
        contexts = sorted(args.contexts)
        # A 2^20 prompt holds [B, 2^20, d_model] activations (and attention scores over its
        # windows): the headline model at batch 1 fits in this machine's memory (~12 GiB
        # peak); a full-projection layer's FFT prefill is ~40x a tensordot one's.
        # (only with the default contexts: --contexts picks every prompt length)
        lds_contexts = {("stu_tensordot", 1): [2**20]} if contexts == list(CONTEXTS) else {}
    new_tokens = args.new or (64 if args.quick else 8192)
    max_len = max(contexts) + new_tokens  # the STU filters' length; LDS layers have no limit
    epoch = default_block_len("futurefill", max_len)
    if new_tokens < 2 * epoch:
        print(f"note: {new_tokens} new tokens span under two FutureFill epochs of {epoch}")
    distill_s = {}
    rows = []
    for name in models:
        pattern, projection = MODELS[name]
        config = ModelConfig(
            d_model=D, num_layers=4, max_len=max_len, vocab_size=256, num_filters=K,
            layer_pattern=pattern, stu_projection=projection,
        )  # fmt: skip
        model = SpectralModel(config, rngs=nnx.Rngs(0))
        start = time.perf_counter()  # only lds takes time: it distills
        plans = {
            (s, h): lds_plan(model, h, args) if s == "lds" else decode_plan(model, s)
            for s in args.strategies
            for h in (args.lds_horizons if s == "lds" else ["none"])
        }
        distill_s[name] = time.perf_counter() - start
        for batch in batches:
            for (strategy, horizon), plan in plans.items():
                past: list[float] = []
                extra = lds_contexts.get((name, batch), []) if strategy == "lds" else []
                label = strategy if horizon == "none" else f"{strategy} {horizon}"
                for context in contexts + extra:
                    tag = f"  {name:>16} B={batch:<3} ctx {context:>8}  {label:>14}"
                    if predicted_seconds(past) > args.budget:  # all calls at this context
                        print(f"{tag}  skipped (predicted over the {args.budget:.0f} s budget)")
                        break
                    key = jax.random.key(context)
                    prompt = jax.random.randint(key, (batch, context), 0, 256, jnp.int32)
                    start = time.perf_counter()
                    try:
                        timing = time_model(plan, prompt, new_tokens, args.repeats)
                    except ValueError as err:  # a layer that cannot run this context
                        print(f"{tag}  skipped: {err}")
                        break
                    except jax.errors.JaxRuntimeError as err:  # e.g. out of memory
                        print(f"{tag}  skipped: {str(err).splitlines()[0]}")
                        break
                    past.append(time.perf_counter() - start)
                    row = {"mode": "model", "strategy": strategy, "context": context,
                           "tokens": new_tokens, **timing, "model": name,
                           "batch": batch, "horizon": horizon}  # fmt: skip
                    rows.append(row)
                    record(row)
                    print(f"{tag}  {row['tokens_per_second']:10.1f} tok/s  prefill "
                          f"{row['prefill_seconds']:.3f} s  compile {row['compile_seconds']:.2f} s"
                          f"  cache {row['cache_bytes'] / 2**20:.2f} MiB/seq")  # fmt: skip
    summarize(rows)
    return {
        "models": {
            n: f"4 x {MODELS[n][0]} layers, d_model {D}, K {K}, {MODELS[n][1]}, vocab 256"
            for n in models
        },
        "model_max_len": max_len,
        "lds_model": f"distill_model(model), {args.lds_arithmetic or 'default'} arithmetic, "
        f"horizons {', '.join(args.lds_horizons)}",
        "lds_distill_seconds": distill_s,
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "futurefill_epoch": epoch,
    }


def summarize(rows: list[dict]) -> None:
    """For each model at each batch and each LDS horizon: LDS tokens/s against FutureFill,
    naive and (other horizons) the plain ``none`` LDS, its prefill against the STU's, and the
    spread of its tokens/s over contexts."""
    by = {(r["model"], r["batch"], r["strategy"], r["horizon"], r["context"]): r for r in rows}
    groups = dict.fromkeys((r["model"], r["batch"], r["horizon"]) for r in rows)
    for model, batch, horizon in groups:
        lds = {k[-1]: r for k, r in by.items() if k[:4] == (model, batch, "lds", horizon)}
        if not lds:
            continue
        print(f"\n{model} batch {batch}, lds horizon {horizon}:")
        for context, row in sorted(lds.items()):
            cells = [f"lds {row['tokens_per_second']:9.1f} tok/s"]
            others = ["futurefill", "naive"] + (["lds"] if horizon != "none" else [])
            for other in others:
                base = by.get((model, batch, other, "none", context))
                if base is not None:
                    ratio = row["tokens_per_second"] / base["tokens_per_second"]
                    cells.append(f"{ratio:6.2f}x {'plain lds' if other == 'lds' else other}")
            stu = by.get((model, batch, "futurefill", "none", context))
            if stu is not None:
                ratio = row["prefill_seconds"] / stu["prefill_seconds"]
                cells.append(f"prefill {ratio:.2f}x the STU's")
            print(f"  ctx {context:>8}: " + ", ".join(cells))
        rates = [r["tokens_per_second"] for r in lds.values()]
        mid = statistics.median(rates)
        spread = max(abs(r / mid - 1) for r in rates)
        print(f"  lds tokens/s within +-{100 * spread:.0f}% of the median {mid:.0f}")


MODE = Mode(
    "model",
    bench,
    panel=(next(iter(MODELS)), "4-layer STU-only tensordot model, batch 1"),
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    main(__doc__, [MODE])
