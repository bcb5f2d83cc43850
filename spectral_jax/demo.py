"""``spectral-jax demo``: the main job end to end on a small built-in default (CPU, minutes).

Trains a 2-layer STU model on a synthetic linear-dynamical-system regression task and prints
the loss falling.
"""

from __future__ import annotations

import argparse
import time

from spectral_jax.train import train
from spectral_jax.train.presets import apply_overrides, lds_small


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed")


def run(args: argparse.Namespace) -> int:
    config = apply_overrides(
        lds_small(),
        [f"steps={args.steps}", f"seed={args.seed}", f"optim.decay_steps={args.steps + 1}"],
    )
    print(f"== training a 2-layer STU model on LDS regression (L={config.task.seq_len}) ==")
    start = time.perf_counter()
    result = train(config)
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    print(
        f"trained {result.step} steps in {time.perf_counter() - start:.1f} s: "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[-1] / losses[0]:.1%} of the first)"
    )
    return 0
