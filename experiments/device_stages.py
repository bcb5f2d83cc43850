"""The stages of ``device_check.py``, in the order it runs them (``from device_stages import
STAGES``: the scripts run as ``python experiments/NAME.py``, so this folder is on the path):
environment, install and tests (:mod:`device_setup`), then the benchmarks, each a function of
a ``bench_*.py`` script called with the sizes below (``tiny``: seconds on a CPU; full: the
sizes of issue 19, for one accelerator). What a stage gets and may raise: :mod:`device_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import bench_decode_layer
import bench_decode_model
import bench_filters
import bench_lds_prefill
import bench_stu
import bench_train
import decode_bench_common
import jax
from device_run import Stage, StageRun, first_line, restore_env
from device_setup import environment, install, tests

from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.distillation import distill_model
from spectral_jax.train.flops import peak_flops

# Every tiny LDS (layer decode to 2^9, model decode 256 + 256, prefill) is fitted at this
# length, so that one bank fit (seconds, cached) serves them all.
TINY_LEN = 2**9
# Full sizes of the stages that distill (each fits an LDS bank at its longest length).
LAYER_EXPONENTS = (10, 12, 14, 16, 18, 20)
MODEL_NEW = 2048
PREFILL_CONTEXTS = (8192, 32768, 131072)
DECODE_STRATEGIES = ("lds", "futurefill", "naive")  # the headline first: a cut keeps it
DECODE_KEYS = ("mode", "strategy", "context", "tokens", "seconds", "tokens_per_second",
               "prefill_seconds", "compile_seconds", "cache_bytes", "model", "batch",
               "horizon")  # fmt: skip


# ---- banks fitted ahead --------------------------------------------------------------------------


def full_bank_lengths() -> tuple[int, ...]:
    """The lengths at which the full-size stages fit their LDS banks (K = 24, standard, 120
    states, plain): the layer decode's 2^20, the model decode's longest context plus its new
    tokens, the prefill's longest prompt."""
    model_len = max(bench_decode_model.CONTEXTS) + MODEL_NEW
    return (2 ** max(LAYER_EXPONENTS), model_len, max(PREFILL_CONTEXTS))


def prefit_banks(directory: Path) -> list[Path]:
    """Fit the full-size stages' banks on this host (minutes on a CPU: a cold fit at 2^20
    dominates) and copy their cache files, small, into ``directory``: a device host run with
    ``SPECTRAL_JAX_CACHE=directory`` reads them instead of fitting. The filters computed on the
    way (hundreds of MB at 2^20, seconds to recompute) stay behind in a temporary folder."""
    directory.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("SPECTRAL_JAX_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPECTRAL_JAX_CACHE"] = tmp
        try:
            for L in full_bank_lengths():
                start = time.time()
                fit_lds_bank(L, decode_bench_common.K, "standard", 120, arithmetic="plain")
                print(f"fitted the bank at L={L} in {time.time() - start:.0f} s", flush=True)
        finally:
            restore_env("SPECTRAL_JAX_CACHE", before)
        return [Path(shutil.copy2(f, directory)) for f in sorted(Path(tmp).glob("ldsbank-*"))]


# ---- benchmarks ----------------------------------------------------------------------------------


def stu(ctx: StageRun) -> str:
    """STU forward and forward+backward, float32, tensordot then full (bench_stu)."""
    B, L, d, K, repeats = (1, 128, 16, 8, 1) if ctx.tiny else (1, 8192, 1024, 24, 5)
    errors = []
    for mode in ("tensordot", "full"):
        try:
            ctx.record(bench_stu.time_layer(mode, B, L, d, K, repeats))
        except jax.errors.JaxRuntimeError as err:  # e.g. the full projection out of memory
            errors.append(f"{mode}: {first_line(err)}")
    if not ctx.rows:
        raise RuntimeError("; ".join(errors))
    cells = [f"{r['mode']} fwd+bwd {1e3 * r['fwdbwd_s']:.2f} ms" for r in ctx.rows]
    return ", ".join(cells + errors) + f" (B={B} L={L} d={d} K={K}, median of {repeats})"


@contextlib.contextmanager
def filter_cache_off() -> Iterator[None]:
    """Time the filters' computation, not their disk cache (SPECTRAL_JAX_CACHE restored)."""
    before = os.environ.get("SPECTRAL_JAX_CACHE")
    os.environ["SPECTRAL_JAX_CACHE"] = "off"
    try:
        yield
    finally:
        restore_env("SPECTRAL_JAX_CACHE", before)


def filters(ctx: StageRun) -> str:
    """Cold spectral filters, K = 24 (bench_filters; computed on the host)."""
    lengths = [2**12] if ctx.tiny else [2**16, 2**20]
    with filter_cache_off():
        for L in lengths:
            seconds, _, _ = bench_filters.time_fast(L)
            ctx.record({"L": L, "K": bench_filters.K, "seconds": seconds})
    return ", ".join(f"L=2^{r['L'].bit_length() - 1} {r['seconds']:.2f} s" for r in ctx.rows)


def decode_summary(rows: list[dict]) -> str:
    best = {}
    for r in rows:  # the longest context each strategy reached
        if r["context"] >= best.get(r["strategy"], {"context": 0})["context"]:
            best[r["strategy"]] = r
    return ", ".join(
        f"{s} {r['tokens_per_second']:.0f} tok/s at 2^{r['context'].bit_length() - 1}"
        for s, r in best.items()
    )


def decode_layer(ctx: StageRun) -> str:
    """One layer decoding 2^8 and 2^9 (tiny) or 2^10, 2^12, .., 2^20 tokens
    (bench_decode_layer); a strategy stops where one run is predicted over 40 s (tiny: 5 s)."""
    exponents = (8, TINY_LEN.bit_length() - 1) if ctx.tiny else LAYER_EXPONENTS
    args = argparse.Namespace(
        quick=False, exponents=exponents, strategies=DECODE_STRATEGIES,
        budget=min(5.0 if ctx.tiny else 40.0, ctx.left()), lds_arithmetic=None,
    )  # fmt: skip
    bench_decode_layer.bench(args, ctx.record)
    return decode_summary(ctx.rows) + f" (one run predicted over {args.budget:.0f} s: stop)"


def decode_model(ctx: StageRun) -> str:
    """The 4-layer STU tensordot model at batch 1 (bench_decode_model): context 256 and 256 new
    tokens (tiny), or 1k..128k (2^20 for lds) and 2048 new tokens."""
    args = argparse.Namespace(
        quick=ctx.tiny, models=["stu_tensordot"], batches=[1],
        new=TINY_LEN - 256 if ctx.tiny else MODEL_NEW,  # after --quick's one context of 256
        repeats=1 if ctx.tiny else 3, strategies=DECODE_STRATEGIES,
        budget=min(5.0 if ctx.tiny else 30.0, ctx.left()), lds_arithmetic=None,
        contexts=list(bench_decode_model.CONTEXTS), lds_horizons=["none"],
    )  # fmt: skip
    bench_decode_model.bench(args, ctx.record)
    return decode_summary(ctx.rows)


def train(ctx: StageRun) -> str:
    """One hybrid (STU + sliding-window attention) training run in bf16 (bench_train)."""
    L, batch, d, steps = (128, 2, 32, 2) if ctx.tiny else (8192, 8, 1024, 6)
    row = bench_train.measure("hybrid", L, batch, steps, d_model=d, dtype="bfloat16")
    ctx.record(row)
    kind, mfu = jax.devices()[0].device_kind, row["mfu"]
    if mfu is None:
        mfu = f"no MFU (no peak known for {kind})"
    else:
        mfu = f"MFU {100 * mfu:.1f}% of {peak_flops(kind) or 0:.3g} FLOP/s"
    return f"{row['tokens_per_s']:,.0f} tok/s, {mfu}, L={L} B={batch} d={d} bf16, {steps} steps"


def prefill(ctx: StageRun) -> str:
    """The distilled model's prefill against the STU model's (bench_lds_prefill)."""
    contexts, repeats = ([TINY_LEN], 1) if ctx.tiny else (PREFILL_CONTEXTS, 3)
    model = bench_lds_prefill.spectral_model(max(contexts))
    distilled = distill_model(model).model
    for context in contexts:
        ctx.record(bench_lds_prefill.prefill_row(model, distilled, context, repeats, False))
    return ", ".join(f"{r['context']}: lds/stu {r['ratio']:.2f}x" for r in ctx.rows)


TRAIN_KEYS = ("model", "d_model", "dtype", "L", "batch", "remat", "microbatches", "tokens_per_s",
              "tokens_per_s_per_device", "mfu", "step_s")  # fmt: skip
STAGES = (
    Stage("environment", environment, 30, 2, ("id", "platform", "device_kind")),
    Stage("install", install, 180, 5, ("package", "version")),
    Stage("tests", tests, 180, 60, ("test", "outcome", "assumes_f32_matmul")),
    Stage("stu", stu, 45, 20, ("mode", "B", "L", "d", "K", "fwd_s", "fwdbwd_s")),
    Stage("filters", filters, 20, 10, ("L", "K", "seconds")),
    Stage("decode_layer", decode_layer, 90, 30, DECODE_KEYS),
    Stage("decode_model", decode_model, 90, 30, DECODE_KEYS),
    Stage("train", train, 60, 30, TRAIN_KEYS),
    Stage("prefill", prefill, 40, 20, ("context", "stu_s", "lds_s", "ratio")),
)
