"""The ``spectral-jax`` command.

- ``spectral-jax demo``: the main job end to end on a small built-in default (CPU, minutes).
- ``spectral-jax train PRESET [--set key=value ...]``: train a named run (see
  :mod:`spectral_jax.train.presets`), with checkpoints and resume.
- ``spectral-jax distill CKPT OUT``: distill every STU layer of a trained checkpoint into a new
  checkpoint and print the error report.
- ``spectral-jax generate CKPT --prompt TEXT --strategy naive|futurefill|lds``: stream text from a
  language model as it is produced, through the tokenizer saved with the checkpoint.
- ``spectral-jax evaluate CKPT INPUT... --stream-len N``: bits/token and bits/byte per position
  bucket of the training length over long streams of local text, decoded with carried state
  (see :mod:`spectral_jax.apps.evaluate`).
- ``spectral-jax prepare-data INPUT... --out DIR --tokenizer bytes|PATH|bpe:VOCAB``: tokenize
  local text into memory-mappable token shards (see :mod:`spectral_jax.data.prepare`).
- ``spectral-jax convert SRC OUT [--tokenizer PATH/tokenizer.json]``: a flash-stu-2 checkpoint as
  a spectral_jax checkpoint; ``spectral-jax export CKPT OUT``: back to flash-stu-2's layout
  (see :mod:`spectral_jax.apps.convert`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax

from spectral_jax.apps import convert, demo, inference
from spectral_jax.apps import evaluate as evaluation
from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.data.prepare import SHARD_DTYPES, prepare_data
from spectral_jax.data.shards import require_not_shards
from spectral_jax.data.tokenizer import StreamDecoder, encode
from spectral_jax.decode.generate import Sampling, decode_chunks, prefill
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.distill.fit import DEFAULT_NUM_STATES
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.interop import flashstu
from spectral_jax.nn.horizon import parse_distill_horizon
from spectral_jax.train import CheckpointConfig, CheckpointError, load_for_inference, presets, train
from spectral_jax.validation import ARITHMETICS, GENERATION_STRATEGIES, positive_int


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
        require_not_shards(args.checkpoint_dir, "a checkpoint directory")
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
        default=DEFAULT_NUM_STATES,
        help="LDS states per input channel, both signs counted (default 120)",
    )
    parser.add_argument(
        "--arithmetic",
        choices=ARITHMETICS,
        default="plain",
        help="plain float32 recurrences (default: fastest, ~2e-5 relative to the float64 STU) or "
        "float32 pairs (compensated: the exact mode, ~1e-7; slower to compile and run)",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=DEFAULT_TOL,
        help="reduce each channel of a tensordot layer (plain arithmetic) to the fewest states "
        f"whose kernel error at max_len is at most this, relative (default {DEFAULT_TOL:g}); "
        "0 keeps the bank's states",
    )
    parser.add_argument(
        "--states",
        type=int,
        default=None,
        help="at most this many states per channel when reducing (default: as --tol needs)",
    )
    parser.add_argument(
        "--horizon",
        default=None,
        help="memory horizon past the training length L: none, restart:R (R staggered copies "
        "of each layer's state, restarted every L steps), cutoff (exact: the response to "
        "inputs older than L subtracted), tail:W (tail-penalised fit) or cap:C "
        f"(decays with a^L <= C); default {inference.LM_HORIZON} for language models, else none",
    )


def run_distill(args: argparse.Namespace) -> int:
    if args.tol < 0 or args.tol >= 1:
        raise ValueError(f"--tol must be in [0, 1) (0: no reduction), got {args.tol:g}")
    if args.horizon is not None:  # a bad policy fails before the checkpoint is read
        parse_distill_horizon(args.horizon)
    report = inference.distill_checkpoint(
        args.checkpoint,
        args.out,
        num_states=args.num_states,
        arithmetic=args.arithmetic,
        tol=args.tol or None,
        max_states=args.states,
        horizon=args.horizon,
    )
    print(inference.format_distill_report(report))
    print(f"wrote {args.out}")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="directory of a trained or distilled checkpoint")
    parser.add_argument(
        "--prompt", required=True, help="text to continue (encoded by the checkpoint's tokenizer)"
    )
    parser.add_argument(
        "--strategy",
        choices=GENERATION_STRATEGIES,
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
    parser.add_argument(
        "--num-states", type=int, default=DEFAULT_NUM_STATES, help="LDS states (lds strategy)"
    )
    parser.add_argument("--chunk", type=int, default=16, help="tokens decoded per jitted call")


def run_generate(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable bytes in argv arrive as lone surrogates
        raise ValueError(
            f"--prompt is not valid UTF-8 (position {err.start}): pass UTF-8 text"
        ) from None
    model, meta = load_for_inference(args.checkpoint)
    tokenizer = inference.checkpoint_tokenizer(args.checkpoint, meta)
    plan = decode_plan(model, args.strategy, num_states=args.num_states)
    if plan.banks is not None:
        layers = sum(bank["layers"] for bank in plan.banks)
        print(f"[distilled {layers} STU layer(s), {args.num_states} states]", file=sys.stderr)
    model = plan.model
    prompt = encode(tokenizer, args.prompt)
    if not prompt:
        raise ValueError("--prompt must not be empty")
    if max(prompt) >= model.config.vocab_size:
        raise ValueError(
            f"the prompt encodes to id {max(prompt)}, outside the model's vocabulary "
            f"{model.config.vocab_size}: the checkpoint's tokenizer does not fit its model"
        )
    if args.max_new_tokens is None:
        new_tokens = model.config.max_len - len(prompt)
        if new_tokens < 1:
            raise ValueError(
                f"the prompt's {len(prompt)} tokens fill max_len={model.config.max_len}: "
                "pass --max-new-tokens"
            )
    else:
        new_tokens = positive_int("", "--max-new-tokens", args.max_new_tokens)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k)
    model.check_length(
        len(prompt) + new_tokens, f"prompt of {len(prompt)} tokens + {new_tokens} new tokens"
    )
    logits, cache = prefill(model, [prompt], plan.options)
    text = StreamDecoder(tokenizer)
    sys.stdout.write(args.prompt)
    for tokens in decode_chunks(
        model, cache, logits, new_tokens, sampling, jax.random.key(args.seed), chunk=args.chunk
    ):
        sys.stdout.write(text.push(tokens[0].tolist()))
        sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="directory of a trained or distilled checkpoint")
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="a .txt/.jsonl/.parquet file, directory or glob"
    )
    parser.add_argument(
        "--stream-len",
        type=int,
        required=True,
        help="tokens per stream (N), at least L/2 (L: the training length)",
    )
    parser.add_argument("--streams", type=int, default=8, help="streams read side by side (B)")
    parser.add_argument(
        "--offsets-seed", type=int, default=0, help="phase of the evenly spaced stream offsets"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    parser.add_argument(
        "--strategy",
        choices=GENERATION_STRATEGIES,
        help="STU decoding (default: the checkpoint as it is: lds if distilled, else "
        "futurefill, which stops at max_len); lds on a trained checkpoint distills it here",
    )
    parser.add_argument(
        "--num-states", type=int, default=DEFAULT_NUM_STATES, help="LDS states (lds strategy)"
    )
    parser.add_argument("--chunk", type=int, default=256, help="tokens decoded per jitted call")
    parser.add_argument(
        "--horizon",
        help="memory horizon of the STU/LDS layers, none, restart:R or cutoff (distilled "
        "layers; default: the checkpoint's own); with restart:R an STU checkpoint streams past "
        "its max_len",
    )
    parser.add_argument("--json", help="write the report here (JSON)")
    parser.add_argument("--plot", help="plot bits/byte per bucket here (PNG; needs matplotlib)")


def run_evaluate(args: argparse.Namespace) -> int:
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and pathlib.Path(path).is_dir():  # found now, not after the evaluation
            raise ValueError(f"{option} {path} is a directory: pass a file name")
    if args.plot:
        evaluation.require_matplotlib("--plot")
    report = evaluation.evaluate_checkpoint(
        args.checkpoint,
        args.inputs,
        stream_len=args.stream_len,
        streams=args.streams,
        offsets_seed=args.offsets_seed,
        text_field=args.text_field,
        strategy=args.strategy,
        num_states=args.num_states,
        chunk=args.chunk,
        horizon=args.horizon,
    )
    print(evaluation.format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        rows = {report["model"]["kind"]: report["buckets"]}
        title = f"{args.checkpoint}: {report['streams']} streams of {report['stream_len']} tokens"
        evaluation.plot_buckets(rows, report["train_len"], args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="a .txt/.jsonl/.parquet file, directory or glob"
    )
    parser.add_argument("--out", required=True, help="new (or interrupted) output directory")
    parser.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (default), PATH/tokenizer.json, or bpe:VOCAB (train a byte-level BPE)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    parser.add_argument(
        "--val-percent", type=float, default=1.0, help="documents held out (by hash), default 1"
    )
    parser.add_argument(
        "--docs-per-shard", type=int, default=4096, help="documents per shard (default 4096)"
    )
    parser.add_argument("--dtype", choices=SHARD_DTYPES, default="auto", help="token dtype")
    parser.add_argument(
        "--stdlib", action="store_true", help="add the standard library's .py sources"
    )


def run_prepare(args: argparse.Namespace) -> int:
    manifest = prepare_data(
        args.inputs,
        args.out,
        args.tokenizer,
        text_field=args.text_field,
        val_percent=args.val_percent,
        docs_per_shard=args.docs_per_shard,
        dtype=args.dtype,
        stdlib=args.stdlib,
        progress=True,
    )
    for split, counts in manifest["splits"].items():
        print(
            f"{split:>5}: {counts['tokens']:,} tokens, {counts['documents']:,} documents, "
            f"{len(counts['shards'])} shards, {counts['bytes_per_token']:.3f} bytes/token"
        )
    tok = manifest["tokenizer"]
    print(
        f"wrote {args.out} ({manifest['dtype']}, {tok['kind']} tokenizer, vocab "
        f"{tok['vocab_size']}, fingerprint {tok['fingerprint'][:12]})"
    )
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a save_pretrained directory or a .safetensors/.pt file")
    parser.add_argument("out", help="new, empty directory for the spectral_jax checkpoint")
    parser.add_argument("--tokenizer", help="PATH/tokenizer.json to save with it (for generate)")
    parser.add_argument(
        "--preset",
        choices=sorted(presets.PRESETS),
        default="lm_bytes_small",
        help="the run the checkpoint starts (its task, optimizer, seed, batch; the model is the "
        "imported one): train that preset to fine-tune (default lm_bytes_small)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field of the preset, as for train (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--norm-eps",
        type=float,
        default=flashstu.TORCH_RMSNORM_EPS,
        help="RMSNorm epsilon (not in the checkpoint): float32 machine epsilon for torch's "
        f"RMSNorm (default), {flashstu.LIGER_RMSNORM_EPS} if trained with liger_kernel",
    )
    parser.add_argument(
        "--keep-phi",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the checkpoint's filters instead of ours (default: exactly when they differ "
        "from ours by more than float32 rounding, e.g. a bf16 phi)",
    )


def run_convert(args: argparse.Namespace) -> int:
    run = presets.apply_overrides(presets.preset(args.preset), args.overrides)
    report, overrides = convert.convert(
        args.source,
        args.out,
        run,
        tokenizer=args.tokenizer,
        norm_eps=args.norm_eps,
        keep_phi=args.keep_phi,
    )
    print("\n".join(report.lines()))
    for key, path in report.mapped:
        print(f"  {key} -> {path}")
    print(f"wrote {args.out} (step 0 of {args.preset}); fine-tune with:")
    sets = " ".join(f"--set {item}" for item in [*args.overrides, *overrides])
    print(f"  spectral-jax train {args.preset} --checkpoint-dir {args.out} {sets}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="directory of a spectral_jax checkpoint")
    parser.add_argument("out", help="new directory for config.json and model.safetensors")


def run_export(args: argparse.Namespace) -> int:
    written = convert.export(args.checkpoint, args.out)
    for path, key in written:
        print(f"  {path} -> {key}")
    print(f"wrote {args.out}: {len(written)} tensors in flash-stu-2's layout")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectral-jax",
        description="Spectral state space models in JAX: train, distill to LDS, generate.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error in the input"
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
        commands.add_parser("generate", help="stream text from a language-model checkpoint")
    )
    add_evaluate_arguments(
        commands.add_parser(
            "evaluate",
            help="bits/token and bits/byte per position bucket over long streams of text",
            description=evaluation.__doc__,
        )
    )
    add_prepare_arguments(
        commands.add_parser(
            "prepare-data",
            help="tokenize local text files into token shards for training",
            description=prepare_data.__doc__,
        )
    )
    add_convert_arguments(commands.add_parser("convert", help="import a flash-stu-2 checkpoint"))
    add_export_arguments(commands.add_parser("export", help="write a flash-stu-2 checkpoint"))
    return parser


# Errors that describe the user's input (a ValueError names the problem where the input is
# read; UnicodeDecodeError and JSONDecodeError are ValueErrors); any other exception is a bug.
INPUT_ERRORS = (
    ValueError,
    CheckpointError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def describe_input_error(err: BaseException) -> str:
    """One line for an error in the input: the message (its lines joined by "; "), or for a
    path the OS refused, the path, the reason and what to do."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}: check the path"
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error in the input is one line on stderr and rc 2 (``--debug``:
    raised, with its traceback)."""
    args = build_parser().parse_args(argv)
    runners = {
        "demo": demo.run,
        "train": run_train,
        "distill": run_distill,
        "generate": run_generate,
        "evaluate": run_evaluate,
        "prepare-data": run_prepare,
        "convert": run_convert,
        "export": run_export,
    }
    try:
        return runners[args.command](args)
    except INPUT_ERRORS as err:
        if args.debug:
            raise
        print(f"spectral-jax {args.command}: error: {describe_input_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
