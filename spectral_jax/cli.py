"""The ``spectral-jax`` command.

- ``spectral-jax demo``: the main job end to end on a small built-in default (CPU, minutes).
- ``spectral-jax train PRESET [--set key=value ...]``: train a named run (see
  :mod:`spectral_jax.train.presets`), with checkpoints and resume.
- ``spectral-jax distill CKPT OUT``: distill every STU layer of a trained checkpoint into a new
  checkpoint and print the error report.
- ``spectral-jax generate CKPT --prompt TEXT --strategy naive|futurefill|lds``: stream bytes from a
  byte-level model as they are produced.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import sys

import jax

from spectral_jax import demo, inference
from spectral_jax.generate import Sampling, decode_chunks, prefill
from spectral_jax.nn.lds_layer import distill_model
from spectral_jax.nn.mixer import DecodeOptions
from spectral_jax.train import CheckpointConfig, CheckpointError, presets, train
from spectral_jax.validation import positive_int


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", choices=sorted(presets.PRESETS), help="named run")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field by dotted path, e.g. steps=500 or model.d_model=128 (repeatable)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        help="save checkpoints here (local path or gs:// URL) and resume "
        "from the latest complete one",
    )
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--metrics", help="append metrics as JSON lines to this file")
    parser.add_argument("--tensorboard-dir", help="also write TensorBoard events here")


def run_train(args: argparse.Namespace) -> int:
    config = presets.apply_overrides(presets.preset(args.preset), args.overrides)
    changes = {}
    if args.checkpoint_dir:
        changes["checkpoint"] = CheckpointConfig(
            directory=args.checkpoint_dir, save_every=args.save_every, keep=args.keep
        )
    if args.metrics:
        changes["metrics_path"] = args.metrics
    if args.tensorboard_dir:
        changes["tensorboard_dir"] = args.tensorboard_dir
    result = train(dataclasses.replace(config, **changes))
    evals = [r for r in result.history if r["split"] == "eval"]
    if evals:
        print(
            f"final eval at step {evals[-1]['step']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in evals[-1].items() if k not in ("split", "step"))
        )
    return 0


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="directory of a trained checkpoint")
    parser.add_argument("out", help="new, empty directory for the distilled checkpoint")
    parser.add_argument(
        "--num-states",
        type=int,
        default=120,
        help="LDS states per input channel, both signs counted (default 120)",
    )
    parser.add_argument(
        "--arithmetic",
        choices=("compensated", "plain"),
        default="compensated",
        help="float32 pairs (accurate, default) or plain float32 (fastest) recurrences",
    )


def run_distill(args: argparse.Namespace) -> int:
    report = inference.distill_checkpoint(
        args.checkpoint, args.out, num_states=args.num_states, arithmetic=args.arithmetic
    )
    print(inference.format_distill_report(report))
    print(f"wrote {args.out}")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="directory of a trained or distilled checkpoint")
    parser.add_argument("--prompt", required=True, help="text to continue (UTF-8 bytes)")
    parser.add_argument(
        "--strategy",
        choices=("naive", "futurefill", "lds"),
        default="futurefill",
        help="STU decoding: input-history convolution, FutureFill, or the distilled LDS "
        "(distills on the fly unless the checkpoint is already distilled)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: up to the model's max_len; a distilled model (no STU layer) takes any "
        "number, past the length it was trained at",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    parser.add_argument("--num-states", type=int, default=120, help="LDS states (lds strategy)")
    parser.add_argument("--chunk", type=int, default=16, help="bytes decoded per jitted call")


def run_generate(args: argparse.Namespace) -> int:
    model, meta = inference.load_for_inference(args.checkpoint)
    distilled = "distill" in meta
    if model.config.vocab_size != 256:
        raise ValueError(
            f"--prompt needs a byte-level model (vocab 256), got vocab {model.config.vocab_size}"
        )
    if distilled and args.strategy != "lds":
        raise ValueError(f"{args.checkpoint} is distilled (LDS layers): use --strategy lds")
    if args.strategy == "lds" and not distilled:
        print(f"[distilling the STU layers ({args.num_states} states)]", file=sys.stderr)
        model = distill_model(model, num_states=args.num_states)
    prompt = list(args.prompt.encode("utf-8"))
    if not prompt:
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens is None:
        new_tokens = model.config.max_len - len(prompt)
        if new_tokens < 1:
            raise ValueError(
                f"the prompt's {len(prompt)} bytes fill max_len={model.config.max_len}: "
                "pass --max-new-tokens"
            )
    else:
        new_tokens = positive_int("", "--max-new-tokens", args.max_new_tokens)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k)
    # lds: the LDS layers ignore the strategy; a distilled model has no STU layer left
    options = DecodeOptions("futurefill" if args.strategy == "lds" else args.strategy)
    model.check_length(
        len(prompt) + new_tokens, f"prompt of {len(prompt)} bytes + {new_tokens} new bytes"
    )
    logits, cache = prefill(model, [prompt], options)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    for tokens in decode_chunks(
        model, cache, logits, new_tokens, sampling, jax.random.key(args.seed), chunk=args.chunk
    ):
        sys.stdout.write(text.decode(bytes(tokens[0].tolist())))
        sys.stdout.flush()
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectral-jax",
        description="Spectral state space models in JAX: train, distill to LDS, generate.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_arguments(
        commands.add_parser("demo", help="train, distill and decode a small model on CPU (minutes)")
    )
    add_train_arguments(
        commands.add_parser(
            "train",
            help="train a named run with overrides, checkpoints and resume",
            description=presets.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    add_distill_arguments(
        commands.add_parser(
            "distill", help="distill a trained checkpoint's STU layers into LDS layers"
        )
    )
    add_generate_arguments(
        commands.add_parser("generate", help="stream text from a byte-level checkpoint")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runners = {
            "demo": demo.run,
            "train": run_train,
            "distill": run_distill,
            "generate": run_generate,
        }
        return runners[args.command](args)
    except (ValueError, CheckpointError) as err:  # bad input: one clear line, no traceback
        print(f"spectral-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
