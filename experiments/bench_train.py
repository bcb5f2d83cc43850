"""Training throughput of STU-only, hybrid and attention-only models of the same size.

All are byte-level LMs built from the same blocks (pre-norm residual, SwiGLU MLP, d_model=64,
4 layers): ``stu`` has STU mixers only (tensordot mode), ``hybrid`` alternates STU and
sliding-window attention (window 128), ``swa`` has sliding-window attention (window 128) in every
layer, ``transformer`` full causal attention in every layer (window = L; only up to L=4096, since
its [B, H, L, L] scores outgrow this machine's memory beyond). Each row trains with
:func:`spectral_jax.train.train` on the byte corpus and reports tokens/s measured after the
first (compiling) step, in one run:

* every model at L=1024, batch 8;
* every model as L grows from 1k to 16k (1k to 4k with ``--quick``) at batch 2;
* the hybrid at L=1024, batch 8, under each rematerialization policy (``none``, ``full``,
  ``save_dots``) and with 4 microbatches: the price of the memory they save (``--scale`` runs
  only these rows).

Each row also gives tokens/s per device and, where the device's peak FLOP/s is known (or
given by ``--peak-flops``), the MFU of :mod:`spectral_jax.train.flops`.

Usage: python experiments/bench_train.py [--quick] [--scale] [--peak-flops F] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.data.lm_tasks import ByteCorpusLM
from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import TrainConfig, train

MODELS = ("stu", "hybrid", "swa", "transformer")
TRANSFORMER_MAX_L = 4096


def model_config(kind: str, L: int, d_model: int = 64, dtype: str = "float32") -> ModelConfig:
    base = ModelConfig(
        d_model=d_model,
        num_layers=4,
        max_len=L,
        vocab_size=256,
        tie_embeddings=True,
        num_filters=24,
        stu_projection="tensordot",
        window=128,
        dtype=dtype,
    )
    if kind == "stu":
        return base
    if kind == "hybrid":
        return dataclasses.replace(base, layer_pattern="SA")
    if kind == "swa":
        return dataclasses.replace(base, attention_only=True)
    return dataclasses.replace(base, attention_only=True, window=L)


def measure(
    kind: str,
    L: int,
    batch: int,
    steps: int,
    *,
    remat: str = "none",
    microbatches: int = 1,
    peak_flops: float | None = None,
    d_model: int = 64,
    dtype: str = "float32",
) -> dict:
    config = TrainConfig(
        task=ByteCorpusLM(seq_len=L),
        model=dataclasses.replace(model_config(kind, L, d_model, dtype), remat=remat),
        steps=steps,
        global_batch=batch,
        microbatches=microbatches,
        log_every=steps,
        eval_batches=0,
        peak_flops_per_device=peak_flops,
    )
    last = [r for r in train(config).history if "tokens_per_s" in r][-1]
    return {
        "model": kind,
        "d_model": d_model,
        "dtype": dtype,
        "L": L,
        "batch": batch,
        "remat": remat,
        "microbatches": microbatches,
        "tokens_per_s": last["tokens_per_s"],
        "tokens_per_s_per_device": last["tokens_per_s_per_device"],
        "mfu": last.get("mfu"),
        "step_s": batch * L / last["tokens_per_s"],
    }


SCALE_SETTINGS = (("none", 1), ("full", 1), ("save_dots", 1), ("none", 4), ("full", 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths up to 4k, fewer steps")
    parser.add_argument("--scale", action="store_true", help="only the remat/microbatch rows")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s per device, for MFU")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    steps = 4 if args.quick else 8
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    peak = {"peak_flops": args.peak_flops}

    rows = []
    if not args.scale:
        rows += [measure(kind, 1024, 8, steps, **peak) for kind in MODELS]
        rows += [
            measure(kind, L, 2, steps, **peak)
            for kind in MODELS
            for L in lengths
            if kind != "transformer" or L <= TRANSFORMER_MAX_L
        ]
    scale_rows = [
        measure("hybrid", 1024, 8, steps, remat=remat, microbatches=m, **peak)
        for remat, m in SCALE_SETTINGS
    ]

    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}")
    if rows:
        print(f"{'model':<12}{'L':>7}{'batch':>7}{'tokens/s':>12}{'step s':>9}{'vs stu':>8}")
        stu = {(r["L"], r["batch"]): r["tokens_per_s"] for r in rows if r["model"] == "stu"}
        for r in rows:
            ratio = r["tokens_per_s"] / stu[(r["L"], r["batch"])]
            print(
                f"{r['model']:<12}{r['L']:>7}{r['batch']:>7}{r['tokens_per_s']:>12,.0f}"
                f"{r['step_s']:>9.3f}{ratio:>8.2f}"
            )
    print(f"\n{'hybrid L=1024 B=8':<20}{'tok/s/device':>14}{'MFU':>8}{'vs none x1':>12}")
    base = scale_rows[0]["tokens_per_s"]
    for r in scale_rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        label = f"remat={r['remat']} x{r['microbatches']}"
        print(
            f"{label:<20}{r['tokens_per_s_per_device']:>14,.0f}{mfu:>8}"
            f"{r['tokens_per_s'] / base:>12.2f}"
        )
    rows += scale_rows
    if args.json:
        write_json_atomic(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
