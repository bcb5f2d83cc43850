"""Streaming evaluation past the training length: bits/byte over long held-out streams.

Three byte-level models of the ``lm_bytes_small`` size (4 layers, d_model 96, trained on
256-byte windows of the standard-library corpus):

* ``stu``: the trained hybrid STU + attention model (``lm_bytes_small``): its STU filters end
  at 256 positions, so it is evaluated at 1x only;
* ``distilled``: the same model with every STU distilled into an LDS (plain float32): no layer
  has a length limit, so it reads 1x, 2x, 4x, 8x and 16x the training length;
* ``attention``: ``lm_bytes_small`` with ``model.attention_only=true``, trained the same way
  (sliding-window attention, window 64): no length limit either.

Each model reads ``--streams`` held-out streams of ``16 x 256`` bytes (contiguous slices of the
validation files, at evenly spaced offsets) chunk by chunk with its decode state carried
(:func:`spectral_jax.decode.evaluate.stream_losses`). Reported per length ``N``: bits/byte over the
first ``N`` bytes, and over the last half ``(N/2, N]`` (where a model that degrades past its
training length shows it).

Checkpoints are read from ``--stu-checkpoint`` / ``--attention-checkpoint``; a missing one is
trained there first, ``--steps`` steps (default: the preset's 2000, ~30 min each on a 2-core CPU).
Writes ``results.json``, ``results.md`` and ``plot.png`` to ``--out``.

Usage: python experiments/streaming_eval.py [--steps N] [--streams B] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from spectral_jax.atomic_files import write_atomic, write_json_atomic, write_text_atomic
from spectral_jax.decode.evaluate import bits_per_byte, stream_losses
from spectral_jax.nn.distillation import distill_model
from spectral_jax.train import CheckpointConfig, Checkpointer, CheckpointError, load_model, train
from spectral_jax.train.config import task_from_record
from spectral_jax.train.presets import apply_overrides, lm_bytes_small

MULTIPLES = (1, 2, 4, 8, 16)


def ensure_checkpoint(directory: str, overrides: list[str], steps: int | None) -> None:
    """Train ``lm_bytes_small`` with ``overrides`` into ``directory`` unless it holds one."""
    try:
        with Checkpointer(CheckpointConfig(directory), read_only=True):
            return
    except CheckpointError:
        pass
    if steps is not None:
        overrides = [*overrides, f"steps={steps}",
                     f"optim.warmup_steps={min(100, max(1, steps // 10))}",
                     f"optim.decay_steps={steps + 1}", f"eval_every={steps}"]  # fmt: skip
    config = apply_overrides(lm_bytes_small(), overrides)
    print(f"no checkpoint in {directory}: training lm_bytes_small {overrides} there first")
    start = time.perf_counter()
    train(dataclasses.replace(config, checkpoint=CheckpointConfig(directory, save_every=500)))
    print(f"trained in {time.perf_counter() - start:.0f} s")


def held_out_streams(task, count: int, length: int) -> np.ndarray:
    """``count`` contiguous slices ``[count, length + 1]`` of the validation bytes."""
    valid = task.corpus().valid
    if valid.size < length + 1:
        raise ValueError(f"the validation stream has {valid.size} bytes, fewer than {length + 1}")
    starts = np.linspace(0, valid.size - length - 1, count).astype(np.int64)
    return np.stack([valid[s : s + length + 1] for s in starts]).astype(np.int32)


def summarize(losses: np.ndarray, train_len: int) -> dict[str, dict[str, float]]:
    """bits/byte of every multiple ``N`` that ``losses [B, T]`` covers: prefix and last half."""
    out = {}
    for m in MULTIPLES:
        n = m * train_len
        if n <= losses.shape[1]:
            out[str(m)] = {
                "bytes": n,
                "prefix": bits_per_byte(losses[:, :n]),
                "last_half": bits_per_byte(losses[:, n // 2 : n]),
            }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results["models"].items():
        xs = [int(m) for m in rows["bits_per_byte"]]
        ys = [rows["bits_per_byte"][m]["last_half"] for m in rows["bits_per_byte"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stream length / training length (256 bytes)")
    ax.set_ylabel("bits/byte over the last half of the stream")
    ax.set_title(f"Streaming evaluation, {results['streams']} held-out streams")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stu-checkpoint", default="runs/lm_bytes_small")
    parser.add_argument("--attention-checkpoint", default="runs/lm_bytes_small_attention")
    parser.add_argument("--steps", type=int, help="train missing checkpoints this many steps")
    parser.add_argument("--streams", type=int, default=8, help="held-out streams read")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per jitted call")
    parser.add_argument("--num-states", type=int, default=120, help="LDS states per channel")
    parser.add_argument("--out", type=Path, default=Path("results/streaming_eval"))
    args = parser.parse_args()

    ensure_checkpoint(args.stu_checkpoint, [], args.steps)
    ensure_checkpoint(args.attention_checkpoint, ["model.attention_only=true"], args.steps)
    stu, meta = load_model(args.stu_checkpoint)
    attention, attention_meta = load_model(args.attention_checkpoint)
    task = task_from_record(meta["run"])
    train_len = task.seq_len
    distilled = distill_model(stu, num_states=args.num_states, arithmetic="plain").model
    streams = held_out_streams(task, args.streams, MULTIPLES[-1] * train_len)

    runs = {
        "stu": (stu, meta),
        "distilled": (distilled, meta),
        "attention": (attention, attention_meta),
    }
    results = {
        "train_len": train_len,
        "streams": args.streams,
        "bytes_per_stream": streams.shape[1] - 1,
        "device": jax.devices()[0].device_kind,
        "command": "python experiments/streaming_eval.py"
        + (f" --steps {args.steps}" if args.steps else "")
        + f" --stu-checkpoint {args.stu_checkpoint}"
        + f" --attention-checkpoint {args.attention_checkpoint} --streams {args.streams}",
        "models": {},
    }
    for name, (model, m) in runs.items():
        limit = model.length_limit
        length = streams.shape[1] - 1 if limit is None else min(limit, streams.shape[1] - 1)
        start = time.perf_counter()
        losses = stream_losses(model, streams[:, : length + 1], chunk=args.chunk)
        seconds = time.perf_counter() - start
        results["models"][name] = {
            "checkpoint_step": m["step"],
            "length_limit": limit,
            "num_params": model.num_params(),
            "seconds": seconds,
            "bits_per_byte": summarize(losses, train_len),
        }
        print(f"{name}: {length} bytes x {args.streams} streams in {seconds:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    header = "| model (training step) | " + " | ".join(
        f"{m}x ({m * train_len} B)" for m in MULTIPLES
    )
    lines = [
        f"bits/byte over the last half of each stream length (prefix bits/byte in brackets); "
        f"{args.streams} held-out streams, training length {train_len} bytes; "
        f"`{results['command']}`.",
        "",
        header + " |",
        "| --- " * (len(MULTIPLES) + 1) + "|",
    ]
    for name, rows in results["models"].items():
        cells = [
            f"{rows['bits_per_byte'][str(m)]['last_half']:.4f} "
            f"({rows['bits_per_byte'][str(m)]['prefix']:.4f})"
            if str(m) in rows["bits_per_byte"]
            else "- (length limit)"
            for m in MULTIPLES
        ]
        lines.append(f"| {name} ({rows['checkpoint_step']}) | " + " | ".join(cells) + " |")
    write_text_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    plot(results, args.out / "plot.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
