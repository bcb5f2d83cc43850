"""``spectral-jax demo``: the main job end to end on a small built-in default (CPU, minutes).

Trains a 2-layer STU model on a synthetic linear-dynamical-system regression task and prints
the loss falling.
"""

from __future__ import annotations

import argparse
import time

from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import LDSRegression, OptimConfig, TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed")


def demo_config(steps: int, seq_len: int, seed: int) -> TrainConfig:
    """The demo's run: a 2-layer STU regressor on a random symmetric LDS (16 states)."""
    task = LDSRegression(seq_len=seq_len, d_input=4, d_output=4, state_dim=16)
    model = ModelConfig(
        d_model=32, num_layers=2, max_len=seq_len, d_input=4, d_output=4, num_filters=16
    )
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=max(1, steps // 20), decay_steps=steps + 1)
    return TrainConfig(
        task=task,
        model=model,
        optim=optim,
        steps=steps,
        global_batch=16,
        seed=seed,
        log_every=max(1, steps // 10),
    )


def run(args: argparse.Namespace) -> int:
    config = demo_config(args.steps, args.seq_len, args.seed)
    print(f"== training a 2-layer STU model on LDS regression (L={args.seq_len}) ==")
    start = time.perf_counter()
    result = train(config)
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    print(
        f"trained {result.step} steps in {time.perf_counter() - start:.1f} s: "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[-1] / losses[0]:.1%} of the first)"
    )
    return 0
