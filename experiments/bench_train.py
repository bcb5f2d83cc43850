"""Training throughput of STU-only, hybrid and attention-only models of the same size.

All are byte-level LMs built from the same blocks (pre-norm residual, SwiGLU MLP, d_model=64,
4 layers): ``stu`` has STU mixers only (tensordot mode), ``hybrid`` alternates STU and
sliding-window attention (window 128), ``swa`` has sliding-window attention (window 128) in every
layer, ``transformer`` full causal attention in every layer (window = L; only up to L=4096, since
its [B, H, L, L] scores outgrow this machine's memory beyond). Each row trains with
:func:`spectral_jax.train.train` on the byte corpus and reports tokens/s measured after the
first (compiling) step, in one run:

* every model at L=1024, batch 8;
* every model as L grows from 1k to 16k (1k to 4k with ``--quick``) at batch 2.

Usage: python experiments/bench_train.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax

from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import ByteCorpusLM, TrainConfig, train

MODELS = ("stu", "hybrid", "swa", "transformer")
TRANSFORMER_MAX_L = 4096


def model_config(kind: str, L: int) -> ModelConfig:
    base = ModelConfig(
        d_model=64,
        num_layers=4,
        max_len=L,
        vocab_size=256,
        tie_embeddings=True,
        num_filters=24,
        stu_projection="tensordot",
        window=128,
    )
    if kind == "stu":
        return base
    if kind == "hybrid":
        return dataclasses.replace(base, layer_pattern="SA")
    if kind == "swa":
        return dataclasses.replace(base, attention_only=True)
    return dataclasses.replace(base, attention_only=True, window=L)


def measure(kind: str, L: int, batch: int, steps: int) -> dict:
    config = TrainConfig(
        task=ByteCorpusLM(seq_len=L),
        model=model_config(kind, L),
        steps=steps,
        global_batch=batch,
        log_every=steps,
    )
    history = train(config).history
    tokens_per_s = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][-1]
    return {
        "model": kind,
        "L": L,
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "step_s": batch * L / tokens_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths up to 4k, fewer steps")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    steps = 4 if args.quick else 8
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]

    rows = [measure(kind, 1024, 8, steps) for kind in MODELS]
    rows += [
        measure(kind, L, 2, steps)
        for kind in MODELS
        for L in lengths
        if kind != "transformer" or L <= TRANSFORMER_MAX_L
    ]

    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"{'model':<12}{'L':>7}{'batch':>7}{'tokens/s':>12}{'step s':>9}{'vs stu':>8}")
    stu = {(r["L"], r["batch"]): r["tokens_per_s"] for r in rows if r["model"] == "stu"}
    for r in rows:
        ratio = r["tokens_per_s"] / stu[(r["L"], r["batch"])]
        print(
            f"{r['model']:<12}{r['L']:>7}{r['batch']:>7}{r['tokens_per_s']:>12,.0f}"
            f"{r['step_s']:>9.3f}{ratio:>8.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
