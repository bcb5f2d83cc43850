"""Streaming evaluation past the training length: bits/byte per position bucket, with confidence
intervals over sets of held-out streams.

Rows (models of the ``lm_bytes_small`` size: 4 layers, d_model 96, trained on 256-byte windows
of the standard-library corpus), each built by a function in :data:`ROWS`, so that later rows
(horizon policies, streaming STUs, carried-state training) are one entry more:

* ``stu``: the trained hybrid STU + attention model (``lm_bytes_small``): its STU filters end
  at 256 positions, so it reads the first ``L`` positions only;
* ``distilled``: the same model with every STU distilled into an LDS (plain float32): no layer
  has a length limit;
* ``stu restart:2``: the STU under the staggered-restart horizon (:mod:`spectral_jax.nn.horizon`,
  two copies of each layer's cache, naive decoding): its streaming policy, no length limit;
* ``distilled restart:2`` / ``restart:4`` / ``cutoff`` / ``tail:0.01`` / ``cap:0.01`` /
  ``cap:0.001``: the distilled model under each horizon policy (restarts of its LDS states; the
  exact cutoff; a tail-penalised bank fit; an eigenvalue cap); the last two columns are the
  bank's tail-energy ratio and in-window error (``LDSBank.tail_report``, float64, before the
  per-channel reduction);
* ``attention``: ``lm_bytes_small`` with ``model.attention_only=true``, trained the same way
  (sliding-window attention, window 64);
* ``carried``: carried-state post-training (:mod:`spectral_jax.train.carry`) of the distilled
  model: ``lm_bytes_small`` distilled under ``--carry-horizon`` (default ``cap:0.001``, distill's
  default for language models), then trained ``--carry-steps`` more steps on ``--carry-windows``
  consecutive windows per stream, each window starting from the caches the previous one left
  (gradient stopped), at peak learning rate ``--carry-lr`` (:func:`ensure_carried`).

Every row reads the same streams: for each seed of ``--offset-seeds`` (at least 3), ``--streams``
disjoint streams of ``--multiple x 256`` bytes of the validation files at evenly spaced offsets
(:func:`~spectral_jax.decode.evaluate.evenly_spaced_offsets`, the seed picks the phase), decoded
chunk by chunk with carried state (:func:`~spectral_jax.decode.evaluate.stream_losses`) and
summarised per bucket ``[0, L/2)``, ``[L/2, L)``, ``[L, 2L)``, ``[2L, 4L)``, ...
(:func:`~spectral_jax.decode.evaluate.bucket_summary`, the function ``spectral-jax evaluate``
uses). A cell is the mean bits/byte over the offset sets with a 95% Student-t interval over
them; us/token and the state floats per sequence per layer come from the same run.

Two tables of paired differences follow, set by set on the same streams: each bucket minus the
row's own ``[L/2, L)`` (the target: constant quality past ``L``) and each row minus
``attention``, which sees 64 bytes at every position, so that its own differences between
buckets measure the text at those positions, not a memory horizon.

Checkpoints are read from ``--stu-checkpoint`` / ``--attention-checkpoint`` /
``--carried-checkpoint``; a missing one is trained there first, ``--steps`` steps (default: the
preset's 2000, 12-16 min each on a 2-core CPU; the carried one ~4 min). ``--rows`` evaluates some
rows only. ``--quick`` is a smoke run (30 training steps into ``runs/quick_*``, 4 streams of
4 x 256 bytes, output in ``runs/streaming_eval_quick``): its numbers mean nothing. Writes
``results.json``, ``results.md`` and ``plot.png`` to ``--out``.

Usage: python experiments/streaming_eval.py [--steps N] [--streams B] [--multiple M]
  [--offset-seeds S S S ...] [--rows NAME ...] [--carry-steps N] [--carry-windows W]
  [--carry-lr LR] [--carry-horizon POLICY] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from lm_checkpoints import ensure_distilled, ensure_trained, has_checkpoint
from scipy import stats

from spectral_jax.apps.evaluate import plot_buckets
from spectral_jax.atomic_files import write_json_atomic, write_text_atomic
from spectral_jax.data.tokenizer import token_byte_lengths
from spectral_jax.decode import evaluate as ev
from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.horizon import distill_under, parse_distill_horizon, set_horizon
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.train import load_for_inference, load_model
from spectral_jax.train.config import task_from_record

CONFIDENCE = 0.95
# The carried-state post-training of the ``carried`` row (see ensure_carried)
CARRY_STEPS, CARRY_WINDOWS, CARRY_LR, CARRY_HORIZON = 400, 4, 1e-4, "cap:0.001"
REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str) -> str:
    """``path`` as the results name it: relative to the repository (``..`` when outside it)."""
    return os.path.relpath(Path(path).resolve(), REPO)


# A row: (name, build(args) -> (model, checkpoint meta, bank tail options or None), decode options)
Row = tuple[str, Callable[[argparse.Namespace], tuple[nnx.Module, dict[str, Any], Any]], Any]
NAIVE = DecodeOptions(strategy="naive")  # the restarted STU copies step without FutureFill epochs


def stu_row(args, horizon="none"):
    model, meta = load_model(args.stu_checkpoint)
    return set_horizon(model, horizon), meta, None


def distilled_row(args, horizon="none"):
    """The distilled model under a distillation horizon (``parse_distill_horizon``)."""
    model, meta = load_model(args.stu_checkpoint)
    distilled = distill_under(model, horizon, num_states=args.num_states, arithmetic="plain")
    return distilled, meta, parse_distill_horizon(horizon)[1]


def attention_row(args):
    model, meta = load_model(args.attention_checkpoint)
    return model, meta, None


def carried_row(args):
    """The carried-state post-trained model (:func:`ensure_carried`): distilled, under the
    horizon it was distilled and trained with."""
    model, meta = load_for_inference(args.carried_checkpoint)
    return model, meta, parse_distill_horizon(meta["distill"]["horizon"])[1]


def ensure_carried(args) -> None:
    """Unless ``--carried-checkpoint`` holds one: distill ``--stu-checkpoint`` with
    ``--carry-horizon`` into ``{carried}_start``, then post-train it ``--carry-steps`` steps
    with carried state (``carry_windows``: ``--carry-windows`` consecutive windows per stream)
    at peak learning rate ``--carry-lr`` into ``--carried-checkpoint``."""
    if has_checkpoint(args.carried_checkpoint):
        return
    start = f"{args.carried_checkpoint}_start"
    ensure_distilled(args.stu_checkpoint, start, args.carry_horizon)
    overrides = [f"init_from={start}", f"carry_windows={args.carry_windows}",
                 f"optim.learning_rate={args.carry_lr}"]  # fmt: skip
    ensure_trained(args.carried_checkpoint, overrides, args.carry_steps)


ROWS: list[Row] = [
    ("stu", stu_row, DEFAULT_DECODE),
    ("stu restart:2", functools.partial(stu_row, horizon="restart:2"), NAIVE),
    ("distilled", distilled_row, DEFAULT_DECODE),
    ("distilled restart:2", functools.partial(distilled_row, horizon="restart:2"), DEFAULT_DECODE),
    ("distilled restart:4", functools.partial(distilled_row, horizon="restart:4"), DEFAULT_DECODE),
    ("distilled cutoff", functools.partial(distilled_row, horizon="cutoff"), DEFAULT_DECODE),
    ("distilled tail:0.01", functools.partial(distilled_row, horizon="tail:0.01"), DEFAULT_DECODE),
    ("distilled cap:0.01", functools.partial(distilled_row, horizon="cap:0.01"), DEFAULT_DECODE),
    ("distilled cap:0.001", functools.partial(distilled_row, horizon="cap:0.001"), DEFAULT_DECODE),
    ("attention", attention_row, DEFAULT_DECODE),
    ("carried", carried_row, DEFAULT_DECODE),
]


def bank_tail(model: nnx.Module, tail: Any, num_states: int) -> dict[str, float] | None:
    """The tail report (``LDSBank.tail_report``) of the bank a distilled row's layers use, or
    None for undistilled rows (``tail`` None)."""
    if tail is None:
        return None
    stu = model.config.stu_config()
    bank, _ = fit_lds_bank(stu.max_len, stu.num_filters, stu.variant, num_states, tail=tail)
    return bank.tail_report()


def interval(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` (one per offset set) and the half-width of its 95% Student-t
    interval (``t_{0.975, n-1} * std / sqrt(n)``)."""
    values = np.asarray(values, np.float64)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, values.size - 1) * values.std(ddof=1)
    return float(values.mean()), float(half / math.sqrt(values.size))


def evaluate_row(
    model, offset_sets, valid, target_bytes, train_len, args, options
) -> dict[str, Any]:
    """One row over every offset set: per bucket the mean and CI of bits/byte and bits/token,
    the per-set values, us/token (mean over sets) and state floats per sequence per layer."""
    limit = model.length_limit
    length = args.multiple * train_len if limit is None else min(limit, args.multiple * train_len)
    buckets = ev.position_buckets(train_len, length)
    per_set, timings = [], []
    for seed, offsets in offset_sets.items():
        streams = ev.cut_streams(valid, offsets, args.multiple * train_len)[:, : length + 1]
        clock = ev.StreamProgress(f"  offsets seed {seed}", streams.shape[0])
        losses = ev.stream_losses(model, streams, chunk=args.chunk, options=options, progress=clock)
        per_set.append(ev.bucket_summary(losses, target_bytes[seed][:, :length], buckets))
        timings.append(clock.us_per_token)
    cells = []
    for index, bucket in enumerate(per_set[0]):
        cell = {k: bucket[k] for k in ("start", "stop", "label", "cut", "tokens")}
        for key in ("bits_per_byte", "bits_per_token"):
            values = [summary[index][key] for summary in per_set]
            cell[key], cell[f"{key}_ci"] = interval(values)
            cell[f"{key}_per_set"] = values
        cells.append(cell)
    return {
        "length_limit": limit,
        "stream_len": length,
        "num_params": model.num_params(),
        "us_per_token": float(np.mean(timings)),
        "state_floats_per_sequence": ev.state_floats(model, length, options),
        "mixers": [type(block.mixer).__name__ for block in model.blocks],
        "buckets": cells,
    }


def table(results: dict[str, Any]) -> list[str]:
    """The markdown table: one row per model, one column per bucket (mean +- CI half-width)."""
    longest = max(results["rows"].values(), key=lambda r: r["stream_len"])
    labels = [b["label"] for b in longest["buckets"]]
    lines = [
        "| model (training step) | "
        + " | ".join(labels)
        + " | us/token | state floats/seq/layer | bank tail energy | bank in-window err |",
        "| --- " * (len(labels) + 5) + "|",
    ]
    for name, row in results["rows"].items():
        cells = [f"{b['bits_per_byte']:.4f} ± {b['bits_per_byte_ci']:.4f}" for b in row["buckets"]]
        cells += ["- (length limit)"] * (len(labels) - len(cells))
        layers = zip(row["mixers"], row["state_floats_per_sequence"], strict=True)
        state = "; ".join(sorted({f"{mixer} {floats:,}" for mixer, floats in layers}))
        tail = row["bank_tail"]
        cells += [f"{row['us_per_token']:.1f}", state]
        cells += ["-", "-"] if tail is None else [
            f"{tail['tail_energy_ratio']:.2e}", f"{tail['in_window_error']:.2e}"
        ]  # fmt: skip
        lines.append(f"| {name} ({row['checkpoint_step']}) | " + " | ".join(cells) + " |")
    return lines


def difference_table(results: dict[str, Any], against: Callable[[str, int], Any]) -> list[str]:
    """Markdown rows of paired differences: per row and bucket ``i``, its bits/byte minus
    ``against(row, i)`` (``(row, bucket)`` whose per-set values it is compared with, or None
    for no cell), set by set on the same streams, as mean +- half-width of the 95% interval."""
    longest = max(results["rows"].values(), key=lambda r: r["stream_len"])
    labels = [b["label"] for b in longest["buckets"]]
    lines = ["| model | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
    for name, row in results["rows"].items():
        cells = []
        for index, bucket in enumerate(row["buckets"]):
            other = against(name, index)
            if other is None or other[0] not in results["rows"]:
                cells.append("-")
                continue
            base = results["rows"][other[0]]["buckets"][other[1]]["bits_per_byte_per_set"]
            mean, half = interval(np.subtract(bucket["bits_per_byte_per_set"], base).tolist())
            cells.append(f"{mean:+.3f} ± {half:.3f}")
        cells += ["-"] * (len(labels) - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stu-checkpoint", default="runs/lm_bytes_small")
    parser.add_argument("--attention-checkpoint", default="runs/lm_bytes_small_attention")
    parser.add_argument("--steps", type=int, help="train missing checkpoints this many steps")
    parser.add_argument("--streams", type=int, default=64, help="held-out streams per offset set")
    parser.add_argument("--multiple", type=int, default=16, help="stream length / training length")
    parser.add_argument("--offset-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chunk", type=int, default=256, help="tokens per jitted call")
    parser.add_argument("--num-states", type=int, default=120, help="LDS states per channel")
    parser.add_argument("--carried-checkpoint", default="runs/lm_bytes_small_carried")
    parser.add_argument(
        "--carry-steps",
        type=int,
        default=CARRY_STEPS,
        help="carried-state post-training steps (a multiple of --carry-windows)",
    )
    parser.add_argument(
        "--carry-windows",
        type=int,
        default=CARRY_WINDOWS,
        help="consecutive windows per stream in carried-state training",
    )
    parser.add_argument("--carry-lr", type=float, default=CARRY_LR, help="its peak learning rate")
    parser.add_argument(
        "--carry-horizon", default=CARRY_HORIZON, help="horizon of its distillation"
    )
    parser.add_argument("--rows", nargs="+", choices=[name for name, _, _ in ROWS],
                        help="evaluate only these rows (default: all)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/streaming_eval"))
    parser.add_argument("--quick", action="store_true", help="a smoke run (see the docstring)")
    args = parser.parse_args()
    if args.quick:
        args.steps = args.steps or 30
        args.carry_steps = 2 * args.carry_windows
        args.streams, args.multiple = 4, 4
        args.stu_checkpoint, args.attention_checkpoint = "runs/quick_lm", "runs/quick_attention"
        args.carried_checkpoint = "runs/quick_carried"
        args.out = Path("runs/streaming_eval_quick")
    if len(set(args.offset_seeds)) < 3:
        parser.error("--offset-seeds needs at least 3 different seeds (one interval per cell)")
    rows = [row for row in ROWS if args.rows is None or row[0] in args.rows]

    ensure_trained(args.stu_checkpoint, [], args.steps)
    ensure_trained(args.attention_checkpoint, ["model.attention_only=true"], args.steps)
    if any(name == "carried" for name, _, _ in rows):
        ensure_carried(args)
    _, meta = load_model(args.stu_checkpoint)
    task = task_from_record(meta["run"])
    train_len, stream_len = task.seq_len, args.multiple * task.seq_len
    valid = task.corpus().valid.astype(np.int32)
    offset_sets = {
        seed: ev.evenly_spaced_offsets(valid.size, args.streams, stream_len, seed)
        for seed in args.offset_seeds
    }
    if len({tuple(o) for o in offset_sets.values()}) < len(offset_sets):
        raise SystemExit("two seeds gave the same stream offsets: the text leaves no room")
    lengths = token_byte_lengths(task.text_tokenizer())
    target_bytes = {
        seed: lengths[ev.cut_streams(valid, offsets, stream_len)[:, 1:]]
        for seed, offsets in offset_sets.items()
    }
    carry_flags = ""
    if any(name == "carried" for name, _, _ in rows):
        carry_flags = (
            f" --carried-checkpoint {repo_relative(args.carried_checkpoint)} --carry-steps "
            f"{args.carry_steps} --carry-windows {args.carry_windows} --carry-lr "
            f"{args.carry_lr:g} --carry-horizon {args.carry_horizon}"
        )
    results = {
        "train_len": train_len,
        "stream_len": stream_len,
        "streams": args.streams,
        "offset_seeds": args.offset_seeds,
        "offsets": {str(seed): o.tolist() for seed, o in offset_sets.items()},
        "confidence": CONFIDENCE,
        "device": jax.devices()[0].device_kind,
        "command": "python experiments/streaming_eval.py"
        + (" --quick" if args.quick else "")
        + (f" --steps {args.steps}" if args.steps else "")
        + f" --stu-checkpoint {repo_relative(args.stu_checkpoint)}"
        + f" --attention-checkpoint {repo_relative(args.attention_checkpoint)}"
        + f" --streams {args.streams}"
        + f" --multiple {args.multiple} --offset-seeds {' '.join(map(str, args.offset_seeds))}"
        + (f" --rows {' '.join(repr(name) for name, _, _ in rows)}" if args.rows else "")
        + carry_flags,
        "rows": {},
    }
    for name, build, options in rows:
        model, row_meta, tail = build(args)
        print(f"{name}:")
        row = evaluate_row(model, offset_sets, valid, target_bytes, train_len, args, options)
        results["rows"][name] = {
            "checkpoint_step": row_meta["step"],
            "bank_tail": bank_tail(model, tail, args.num_states),
            **row,
        }

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    lines = [
        f"bits/byte per position bucket (L = {train_len} bytes, the training length), mean ± "
        f"half-width of the {CONFIDENCE:.0%} interval over {len(args.offset_seeds)} sets of "
        f"{args.streams} held-out streams of {stream_len} bytes; us/token with the streams of a "
        f"set side by side ({results['device']}); `{results['command']}`.",
        "",
        *table(results),
        "",
        "Each bucket minus the row's own `[L/2, L)` bucket, set by set (the issue's target: "
        "every bucket within +0.03):",
        "",
        *difference_table(results, lambda name, index: (name, 1) if index > 1 else None),
        "",
        "Each row minus `attention` in the same bucket, set by set on the same streams:",
        "",
        *difference_table(
            results, lambda name, index: None if name == "attention" else ("attention", index)
        ),
    ]
    write_text_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    rows = {name: row["buckets"] for name, row in results["rows"].items()}
    title = f"{len(args.offset_seeds)} x {args.streams} held-out streams of {stream_len} bytes"
    plot_buckets(rows, train_len, str(args.out / "plot.png"), title)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
