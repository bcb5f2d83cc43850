"""Reduced vs unreduced distillation of a trained byte LM: bits/byte, greedy continuations,
state bytes per sequence and decode tokens/s at several batch sizes, in one run.

Both distillations use the same horizon (``--horizon``, default the language models' default,
:data:`~spectral_jax.apps.inference.LM_HORIZON`), so the reduction's own cost is what differs.

Usage: python experiments/reduce_quality.py --checkpoint DIR [--tol TOL] [--horizon POLICY]
       [--batches 1 16 64]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from distill_lm import PROMPT_BYTES, PROMPTS, bits_per_byte

from spectral_jax.apps.inference import LM_HORIZON, distill_with_report, format_distill_report
from spectral_jax.decode.generate import generate
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.nn.horizon import parse_distill_horizon, set_horizon
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.train import load_model
from spectral_jax.train.config import task_from_record


def state_bytes(model) -> int:
    """Bytes of every LDS layer's recurrent state for one sequence."""
    caches = [
        m.init_cache(1, 1)
        for _, m in __import__("flax").nnx.iter_modules(model)
        if isinstance(m, LDSLayer)
    ]
    return sum(leaf.nbytes for c in caches for leaf in jax.tree.leaves(c.state))


def tokens_per_s(plan, prompts, new_tokens: int) -> float:
    run = lambda: jax.block_until_ready(  # noqa: E731
        generate(plan.model, prompts, new_tokens, options=plan.options)
    )
    run()
    start = time.perf_counter()
    run()
    return prompts.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    parser.add_argument("--horizon", default=LM_HORIZON)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=128)
    args = parser.parse_args()
    model, meta = load_model(args.checkpoint)
    task = task_from_record(meta["run"])
    models = {"stu": model}
    policy, tail = parse_distill_horizon(args.horizon)
    for name, tol in (("unreduced", None), ("reduced", args.tol)):
        distilled, report = distill_with_report(
            model, meta["run"], num_states=120, arithmetic="plain", tol=tol, tail=tail
        )
        models[name] = set_horizon(distilled, policy)
        print(f"== {name}\n{format_distill_report(report)}")
    bpb = {name: bits_per_byte(m, task, args.eval_batches) for name, m in models.items()}
    prompts = jnp.asarray([list(p.encode()[:PROMPT_BYTES]) for p in PROMPTS], jnp.int32)
    plans = {
        "stu": decode_plan(model, "naive"),
        **{n: decode_plan(model, "lds", distilled=models[n]) for n in ("unreduced", "reduced")},
    }
    greedy = {
        n: np.asarray(generate(p.model, prompts, args.new_tokens, options=p.options))
        for n, p in plans.items()
    }
    speed = {}
    for b in args.batches:
        rows = jnp.tile(prompts, (-(-b // 5), 1))[:b]
        for n in ("unreduced", "reduced"):
            speed[f"{n}_b{b}"] = tokens_per_s(plans[n], rows, args.speed_tokens)
    results = {
        "checkpoint": args.checkpoint,
        "step": meta["step"],
        "tol": args.tol,
        "horizon": args.horizon,
        "bits_per_byte": bpb,
        "gap_vs_stu": {n: v - bpb["stu"] for n, v in bpb.items()},
        "greedy_identical_of_5_vs_stu": {
            n: int(np.sum(np.all(t == greedy["stu"], axis=1))) for n, t in greedy.items()
        },
        "state_bytes_per_sequence": {n: state_bytes(models[n]) for n in ("unreduced", "reduced")},
        "decode_tokens_per_s": speed,
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
