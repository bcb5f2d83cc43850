"""``spectral-jax demo``: the main job end to end on a small built-in default (CPU, minutes).

1. Train a small byte-level language model (STU alternating with sliding-window attention) on
   the Python standard library, printing the loss falling.
2. Distill its STU layers into LDS layers and print the error report.
3. Sample from one prompt with the three decoding strategies (naive convolution, FutureFill,
   distilled LDS) with the same PRNG key, check that they agree, and print a latency table.
"""

from __future__ import annotations

import argparse
import time

import jax

from spectral_jax.apps.inference import distill_with_report, format_distill_report
from spectral_jax.decode.generate import Sampling, generate
from spectral_jax.decode.strategy import DecodePlan, decode_plan
from spectral_jax.train import train
from spectral_jax.train.config import run_record
from spectral_jax.train.presets import apply_overrides, lm_bytes_small
from spectral_jax.validation import GENERATION_STRATEGIES

PROMPT = "import os\n"
# The small model repeats itself when decoding greedily; sampling shows more of what it learned.
SAMPLING = Sampling(temperature=0.8, top_k=20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    parser.add_argument("--num-states", type=int, default=80, help="LDS states per channel")
    parser.add_argument("--new-tokens", type=int, default=96, help="bytes to generate")


def demo_config(steps: int, seed: int):
    """A 2-layer hybrid byte LM at L=128: lm_bytes_small, scaled down to train in ~a minute."""
    return apply_overrides(
        lm_bytes_small(),
        [
            f"steps={steps}",
            f"seed={seed}",
            "global_batch=16",
            "task.seq_len=128",
            "model.max_len=128",
            "model.d_model=64",
            "model.num_layers=2",
            "model.window=32",
            f"log_every={max(1, steps // 10)}",
            "eval_every=0",
            f"optim.warmup_steps={min(20, steps // 10)}",
            f"optim.decay_steps={steps + 1}",
        ],
    )


def timed_generate(plan: DecodePlan, prompt, new_tokens):
    """Sampled bytes and decode seconds (of the second run; the first compiles)."""
    run = lambda: jax.block_until_ready(  # noqa: E731
        generate(
            plan.model, [prompt], new_tokens, SAMPLING, jax.random.key(0), options=plan.options
        )
    )
    run()
    start = time.perf_counter()
    tokens = run()
    return bytes(tokens[0].tolist()), time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    config = demo_config(args.steps, args.seed)
    print(f"== 1. training a 2-layer STU + attention byte LM ({args.steps} steps, L=128) ==")
    start = time.perf_counter()
    result = train(config)
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    print(
        f"trained in {time.perf_counter() - start:.0f} s: loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} nats/byte"
    )

    print(f"\n== 2. distilling the STU layers into LDS layers ({args.num_states} states) ==")
    distilled, report = distill_with_report(
        result.model, run_record(config), num_states=args.num_states, arithmetic="plain"
    )
    print(format_distill_report(report))

    print(f"\n== 3. sampling {args.new_tokens} bytes with each decoding strategy (same key) ==")
    prompt = list(PROMPT.encode())
    outputs = {
        name: timed_generate(
            decode_plan(result.model, name, distilled=distilled), prompt, args.new_tokens
        )
        for name in GENERATION_STRATEGIES
    }
    print(PROMPT + outputs["naive"][0].decode("utf-8", "replace"))
    print(f"\n{'strategy':<12}{'seconds':>9}{'ms/byte':>9}{'same bytes as naive':>21}")
    for name, (text, seconds) in outputs.items():
        same = sum(a == b for a, b in zip(text, outputs["naive"][0], strict=True))
        print(
            f"{name:<12}{seconds:>9.3f}{1e3 * seconds / args.new_tokens:>9.2f}"
            f"{same:>15}/{args.new_tokens}"
        )
    return 0
