"""``spectral-jax evaluate``: a checkpoint's loss per position bucket over long streams of text.

:func:`evaluate_checkpoint` loads a trained or distilled checkpoint (as ``generate`` does, with
the checkpoint fall-back), reads the inputs (the forms ``prepare-data`` takes), tokenizes them
with the checkpoint's tokenizer, cuts ``streams`` disjoint streams of ``stream_len`` tokens at
evenly spaced offsets of the joined documents, decodes them with carried state and reports
bits/token (and bits/byte where the tokenizer knows bytes) per position bucket of the training
length ``L``: ``[0, L/2)``, ``[L/2, L)``, ``[L, 2L)``, ``[2L, 4L)``, ... (see
:mod:`spectral_jax.decode.evaluate`, which does the work for this command and for
``experiments/streaming_eval.py`` alike). Every check on the arguments and the inputs runs
before the decode, and nothing is written until the report is complete.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from spectral_jax.apps import inference
from spectral_jax.atomic_files import write_atomic
from spectral_jax.data import sources
from spectral_jax.data.prepare import documents
from spectral_jax.data.tokenizer import describe, token_byte_lengths
from spectral_jax.decode import evaluate as ev
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.distill.fit import DEFAULT_NUM_STATES
from spectral_jax.nn.attention import SlidingWindowAttention
from spectral_jax.nn.horizon import parse_horizon, set_horizon
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.train import load_for_inference
from spectral_jax.train.config import task_from_record
from spectral_jax.validation import GenerationStrategy, positive_int


def _mixers(model: nnx.Module) -> list[str]:
    return [type(block.mixer).__name__ for block in model.blocks]


def model_kind(model: nnx.Module, distilled: bool) -> str:
    """``"distilled"``, ``"attention-only"`` or ``"trained"`` (STU layers, with their length
    limit)."""
    if distilled:
        return "distilled"
    if all(isinstance(block.mixer, SlidingWindowAttention) for block in model.blocks):
        return "attention-only"
    return "trained"


def require_matplotlib(what: str) -> None:
    """ValueError naming ``what`` unless matplotlib (the ``plots`` extra) imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{what} needs matplotlib: pip install 'spectral_jax[plots]'") from None


def evaluate_checkpoint(
    checkpoint: str,
    inputs: Sequence[str],
    *,
    stream_len: int,
    streams: int = 8,
    offsets_seed: int = 0,
    text_field: str = "text",
    strategy: GenerationStrategy | None = None,
    num_states: int = DEFAULT_NUM_STATES,
    chunk: int = 256,
    progress: bool = True,
    horizon: str | None = None,
) -> dict[str, Any]:
    """The streaming evaluation of ``checkpoint`` on ``inputs``, as a JSON-ready report.

    ``strategy``: how STU layers decode (:func:`~spectral_jax.decode.strategy.decode_plan`);
    ``None`` takes the checkpoint as it is (``lds`` if it is distilled, else ``futurefill``,
    the STU itself, which stops at its ``max_len``); ``lds`` on a trained checkpoint distills it
    here with ``num_states``. ``offsets_seed`` picks the phase of the evenly spaced offsets.
    ``horizon``: the memory horizon of its STU / LDS layers (``"none"``, ``"restart:R"`` or
    ``"cutoff"`` for distilled layers,
    :func:`~spectral_jax.nn.horizon.set_horizon`; with one, an STU streams past its
    ``max_len``); None keeps the checkpoint's own.

    Report keys: ``checkpoint``, ``step``, ``model`` (``kind``, ``mixers`` per block,
    ``length_limit``, ``num_params``, ``strategy``, ``horizon``, ``distill``), ``tokenizer``,
    ``inputs``, ``documents_joined_with``, ``text_tokens``, ``train_len`` (``L``: the run's
    ``task.seq_len``), ``stream_len``, ``streams``, ``offsets_seed``, ``offsets``,
    ``bits_per_byte_known``, ``device``, ``chunk``, ``us_per_token`` (decode loop wall time per
    position per stream, compilation excluded, ``streams`` side by side),
    ``state_floats_per_sequence`` (per block), and ``buckets`` (see
    :func:`~spectral_jax.decode.evaluate.bucket_summary`).
    """
    stream_len = positive_int("", "--stream-len", stream_len)
    streams = positive_int("", "--streams", streams)
    chunk = positive_int("", "--chunk", chunk)
    offsets_seed = positive_int("", "--offsets-seed", offsets_seed, minimum=0)
    if not inputs:
        raise ValueError("evaluate needs at least one input (a file, directory or glob)")
    if horizon is not None:
        parse_horizon(horizon)  # a bad policy fails before the checkpoint is read
    model, meta = load_for_inference(checkpoint)
    if horizon is not None:
        set_horizon(model, horizon)
    tokenizer = inference.checkpoint_tokenizer(checkpoint, meta)
    train_len = task_from_record(meta["run"]).seq_len
    buckets = ev.position_buckets(train_len, stream_len)
    is_distilled = any(isinstance(m, LDSLayer) for _, m in nnx.iter_modules(model))
    strategy = strategy or ("lds" if is_distilled else "futurefill")
    plan = decode_plan(model, strategy, num_states=num_states)
    model = plan.model
    model.check_length(stream_len, f"--stream-len {stream_len}")
    files = sources.expand_inputs(inputs)
    text, joined = ev.text_tokens(documents(files, text_field), tokenizer, model.config.vocab_size)
    offsets = ev.evenly_spaced_offsets(text.size, streams, stream_len, offsets_seed)
    batch = ev.cut_streams(text, offsets, stream_len)
    clock = ev.StreamProgress("evaluate", streams, file=sys.stderr if progress else None)
    losses = ev.stream_losses(model, batch, chunk=chunk, options=plan.options, progress=clock)
    lengths = token_byte_lengths(tokenizer)
    target_bytes = None if lengths is None else lengths[batch[:, 1:]]
    distill = None
    if plan.banks is not None:  # distilled here
        distill = {"num_states": num_states, "arithmetic": "plain", "in_checkpoint": False}
    elif "distill" in meta:
        saved = meta["distill"]
        distill = {k: saved[k] for k in ("num_states", "arithmetic")} | {"in_checkpoint": True}
    return {
        "checkpoint": checkpoint,
        "step": meta["step"],
        "model": {
            "kind": model_kind(model, is_distilled or plan.banks is not None),
            "mixers": _mixers(model),
            "length_limit": model.length_limit,
            "num_params": model.num_params(),
            "strategy": strategy,
            "horizon": model.config.horizon,
            "distill": distill,
        },
        "tokenizer": describe(tokenizer),
        "inputs": list(inputs),
        "documents_joined_with": joined,
        "text_tokens": int(text.size),
        "train_len": train_len,
        "stream_len": stream_len,
        "streams": streams,
        "offsets_seed": offsets_seed,
        "offsets": offsets.tolist(),
        "bits_per_byte_known": lengths is not None,
        "device": jax.devices()[0].device_kind,
        "chunk": chunk,
        "us_per_token": clock.us_per_token,
        "state_floats_per_sequence": ev.state_floats(model, stream_len, plan.options),
        "buckets": ev.bucket_summary(losses, target_bytes, buckets),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report of :func:`evaluate_checkpoint` as a short table."""
    model = report["model"]
    lines = [
        f"{report['checkpoint']} (step {report['step']}, {model['kind']}, strategy "
        f"{model['strategy']}): {report['streams']} streams x {report['stream_len']} tokens, "
        f"training length L = {report['train_len']}, {report['tokenizer']['kind']} tokenizer",
        f"{'positions':<24}{'tokens':>10}{'bits/token':>12}{'bits/byte':>11}",
    ]
    for b in report["buckets"]:
        per_byte = "-" if b["bits_per_byte"] is None else f"{b['bits_per_byte']:.4f}"
        lines.append(f"{b['label']:<24}{b['tokens']:>10}{b['bits_per_token']:>12.4f}{per_byte:>11}")
    state = ", ".join(
        f"{name} {floats:,}"
        for name, floats in zip(model["mixers"], report["state_floats_per_sequence"], strict=True)
    )
    lines.append(
        f"{report['us_per_token']:.1f} us/token ({report['streams']} streams side by side, "
        f"{report['device']}); state floats per sequence by layer: {state}"
    )
    return "\n".join(lines)


def plot_buckets(
    rows: dict[str, list[dict[str, Any]]], train_len: int, path: str, title: str
) -> None:
    """Bits/byte (bits/token where bytes are unknown) per bucket against the bucket's middle
    position in training lengths, one line per entry of ``rows`` (name -> buckets), with error
    bars where a bucket has ``bits_per_byte_ci`` / ``bits_per_token_ci`` (half-widths), written
    atomically to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    unit = "bits/byte"
    for name, buckets in rows.items():
        key = "bits_per_byte" if buckets[0]["bits_per_byte"] is not None else "bits_per_token"
        unit = unit if key == "bits_per_byte" else "bits/token"
        xs = [(b["start"] + b["stop"]) / 2 / train_len for b in buckets]
        ys, errors = [b[key] for b in buckets], [b.get(f"{key}_ci", 0.0) for b in buckets]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"position in the stream / training length ({train_len}), bucket middles")
    ax.set_ylabel(f"{unit} in the bucket")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
