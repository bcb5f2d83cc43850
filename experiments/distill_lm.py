"""Distill a byte-level language model and compare it with the STU model it came from.

Loads the ``lm_bytes_small`` checkpoint in ``--checkpoint`` (training it there first if the
directory holds none), distills every STU layer as ``spectral-jax distill`` does by default
(the language-model horizon, the per-channel reduction at ``DEFAULT_TOL``) in each float32 LDS
arithmetic of ``--arithmetic`` (default ``plain``, one float32 per state; add ``compensated``,
float32 pairs, to compare the exact mode) and at each reduction tolerance of ``--tol`` (0: the
bank's states unreduced), and reports:

* validation bits/byte of the STU model and the distilled models on the same held-out bytes;
* greedy generations (``--new-tokens`` bytes) from 5 fixed prompts, compared token by token:
  STU with the naive and FutureFill decode caches, and the distilled models;
* decode tokens/s per strategy (prompts batched, jitted prefill + one ``lax.scan``);
* per distilled layer, the reduction's states per channel, bound and measured kernel error.

Writes ``results.json`` and ``results.md`` to ``--out``.

Usage: python experiments/distill_lm.py [--checkpoint DIR] [--out DIR] [--eval-batches N]
       [--arithmetic plain [compensated]] [--tol TOL ...] [--horizon POLICY]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_checkpoints import ensure_trained

from spectral_jax.apps.inference import default_horizon, distill_with_report
from spectral_jax.atomic_files import write_json_atomic, write_text_atomic
from spectral_jax.decode.generate import generate
from spectral_jax.decode.strategy import DecodePlan, decode_plan
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.distill.report import reduction_lines
from spectral_jax.nn.horizon import parse_distill_horizon
from spectral_jax.train import load_model
from spectral_jax.train.config import task_from_record
from spectral_jax.train.step import masked_mean, per_position_loss
from spectral_jax.validation import ARITHMETICS

PROMPT_BYTES = 40
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "class Parser:\n    def __init__(self, text):\n",
    "    for name, value in sorted(items.items()):\n",
    "        if not isinstance(key, str):\n            raise ",
    '"""Return the list of files in the directory, ',
]


def bits_per_byte(model: nnx.Module, task, num_batches: int) -> float:
    @nnx.jit
    def loss_sum(model, inputs, targets, mask):
        losses = per_position_loss(model(inputs), targets, "tokens")
        return masked_mean(losses, mask) * jnp.sum(mask), jnp.sum(mask)

    total, count = 0.0, 0.0
    for step in range(num_batches):
        batch = task.batch(seed=0, step=step, rows=range(8), split="eval")
        s, n = loss_sum(model, *(jnp.asarray(a) for a in batch))
        total, count = total + float(s), count + float(n)
    return total / count / math.log(2)


def decode_all(plan: DecodePlan, prompts, new_tokens) -> tuple[np.ndarray, float]:
    """Greedy tokens ``[5, new_tokens]`` and decode tokens/s (after one compiling run)."""
    run = lambda: jax.block_until_ready(  # noqa: E731
        generate(plan.model, prompts, new_tokens, options=plan.options)
    )
    run()
    start = time.perf_counter()
    tokens = run()
    return np.asarray(tokens), prompts.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/lm_bytes_small", help="checkpoint dir")
    parser.add_argument("--out", type=Path, default=Path("results/distill_lm"))
    parser.add_argument("--eval-batches", type=int, default=16, help="8 sequences each")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--num-states", type=int, default=120)
    parser.add_argument(
        "--arithmetic", nargs="+", choices=ARITHMETICS, default=["plain"], help="LDS arithmetics"
    )
    parser.add_argument("--tol", nargs="+", type=float, default=[DEFAULT_TOL],
                        help="per-channel reduction tolerances (0: unreduced)")  # fmt: skip
    parser.add_argument("--horizon", help="distillation horizon (default: distill's)")
    args = parser.parse_args()

    ensure_trained(args.checkpoint)
    model, meta = load_model(args.checkpoint)
    task = task_from_record(meta["run"])
    horizon = args.horizon or default_horizon(meta["run"])
    tail = parse_distill_horizon(horizon)[1]
    models = {"stu": model}
    reports = {}
    for arithmetic in args.arithmetic:
        for tol in args.tol:
            name = f"lds_{arithmetic}" + (f"_tol{tol:g}" if len(args.tol) > 1 else "")
            models[name], reports[name] = distill_with_report(
                model, meta["run"], num_states=args.num_states, arithmetic=arithmetic,
                tol=tol or None, tail=tail,
            )  # fmt: skip
    bpb = {name: bits_per_byte(m, task, args.eval_batches) for name, m in models.items()}

    prompts = jnp.asarray([list(p.encode()[:PROMPT_BYTES]) for p in PROMPTS], jnp.int32)
    runs = {
        "stu_naive": decode_plan(model, "naive"),
        "stu_futurefill": decode_plan(model, "futurefill"),
        **{name: decode_plan(model, "lds", distilled=models[name]) for name in reports},
    }
    tokens, speed = {}, {}
    for name, plan in runs.items():
        tokens[name], speed[name] = decode_all(plan, prompts, args.new_tokens)
    reference = tokens["stu_naive"]
    agreement = {name: float(np.mean(t == reference)) for name, t in tokens.items()}
    identical = {name: int(np.sum(np.all(t == reference, axis=1))) for name, t in tokens.items()}

    results = {
        "checkpoint": args.checkpoint,
        "step": meta["step"],
        "device": jax.devices()[0].device_kind,
        "horizon": horizon,
        "tol": args.tol,
        "eval_bytes": args.eval_batches * 8 * task.seq_len,
        "bits_per_byte": bpb,
        "bits_per_byte_gap": {k: v - bpb["stu"] for k, v in bpb.items()},
        "distill_reports": reports,
        "greedy_token_agreement_vs_stu_naive": agreement,
        "greedy_identical_generations_of_5": identical,
        "decode_tokens_per_s": speed,
        "generations": {
            name: [
                bytes(p.encode()[:PROMPT_BYTES] + bytes(t.tolist())).decode("utf-8", "replace")
                for p, t in zip(PROMPTS, tok, strict=True)
            ]
            for name, tok in tokens.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    lines = [
        f"Checkpoint `{args.checkpoint}` (step {meta['step']}), {results['eval_bytes']} held-out "
        f"bytes, a bank of {args.num_states} LDS states, horizon {horizon}, reduction tol "
        f"{', '.join(f'{t:g}' for t in args.tol)} (0: unreduced), device: {results['device']}.",
        "",
        "| model | val bits/byte | gap vs STU | greedy tokens = STU naive | identical of 5 |"
        " decode tokens/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, plan in runs.items():
        key = "stu" if plan.model is model else name
        lines.append(
            f"| {name} | {bpb[key]:.5f} | {bpb[key] - bpb['stu']:+.2e} | {agreement[name]:.2%} "
            f"| {identical[name]} | {speed[name]:,.0f} |"
        )
    for name, report in reports.items():
        lines += ["", f"{name}:", "", "```", *reduction_lines(report["banks"]), "```"]
    write_text_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
