"""Checkpoints for inference: load a trained or distilled model; distill a trained checkpoint.

A distilled checkpoint holds the distilled model's state (no optimizer) and, in its metadata,
the source run's record plus ``"distill": {"num_states", "arithmetic", "tol", "max_states",
"blocks", "horizon", "source", "report"}`` (``blocks``: each layer's blocks per channel,
empty where not reduced; ``horizon``: the policy of
:func:`~spectral_jax.nn.horizon.parse_distill_horizon`).
Loading one rebuilds the same structure (the bank fit is deterministic and cached; reduced
layers are built empty at their saved sizes) and restores the saved arrays into it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from spectral_jax.data.shards import require_not_shards
from spectral_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, save_tokenizer
from spectral_jax.decode.evaluate import state_floats
from spectral_jax.distill.fit import DEFAULT_NUM_STATES, NO_TAIL, TailOptions
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.distill.report import reduction_lines
from spectral_jax.nn.distillation import distill_model, layer_blocks
from spectral_jax.nn.horizon import parse_distill_horizon, set_horizon
from spectral_jax.ops.lds_arithmetic import ARITHMETICS_BY_NAME
from spectral_jax.train import CheckpointConfig, Checkpointer, load_model
from spectral_jax.train.config import task_from_record
from spectral_jax.validation import Arithmetic


def distill_with_report(
    model: nnx.Module,
    record: dict[str, Any],
    *,
    num_states: int,
    arithmetic: Arithmetic,
    tol: float | None = DEFAULT_TOL,
    max_states: int | None = None,
    tail: TailOptions = NO_TAIL,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Distill every STU of ``model`` (:func:`~spectral_jax.nn.distillation.distill_model`) and
    measure the result.

    The report holds the per-bank reports of ``distill_model`` (float64 and float32 filter
    errors, coefficient norms), and end to end on one batch of the run's eval split:
    ``rel_err`` (``||y_lds - y_stu|| / ||y_stu||`` of the model outputs) and, for token models,
    ``argmax_agreement`` (fraction of positions whose most likely next token is the same).
    """
    distilled, banks = distill_model(
        model,
        num_states=num_states,
        arithmetic=arithmetic,
        tol=tol,
        max_states=max_states,
        tail=tail,
    )

    task = task_from_record(record)
    inputs = jnp.asarray(task.batch(seed=0, step=0, rows=range(4), split="eval").inputs)
    y_stu = np.asarray(nnx.jit(lambda m, x: m(x))(model, inputs), np.float64)
    y_lds = np.asarray(nnx.jit(lambda m, x: m(x))(distilled, inputs), np.float64)
    report: dict[str, Any] = {
        "stu_layers": sum(bank["layers"] for bank in banks),
        "arithmetic": arithmetic,
        "banks": banks,
        "rel_err": float(np.linalg.norm(y_lds - y_stu) / np.linalg.norm(y_stu)),
    }
    if task.kind == "tokens":
        report["argmax_agreement"] = float(np.mean(y_lds.argmax(-1) == y_stu.argmax(-1)))
    return distilled, report


def format_distill_report(report: dict[str, Any]) -> str:
    """The report of :func:`distill_with_report` as a short table."""
    f32_key = ARITHMETICS_BY_NAME[report["arithmetic"]].report_key
    lines = [
        f"distilled {report['stu_layers']} STU layer(s), {report['arithmetic']} float32 LDS",
        f"{'L':>7}{'K':>4}  {'variant':<9}{'states':>7}{'filter err f64':>16}"
        f"{'filter err f32':>16}{'fit s':>7}",
    ]
    for b in report["banks"]:
        lines.append(
            f"{b['L']:>7}{b['K']:>4}  {b['variant']:<9}{b['num_states']:>7}"
            f"{b['rel_fro_err']:>16.2e}{b[f32_key]:>16.2e}"
            f"{b['fit_seconds']:>7.1f}"
        )
    line = (
        f"model outputs on an eval batch, distilled vs STU: relative error {report['rel_err']:.2e}"
    )
    if "argmax_agreement" in report:
        line += f"; same most likely next token at {report['argmax_agreement']:.2%} of positions"
    horizon = []
    if "horizon" in report:  # distill_checkpoint's: the policy and the state it decodes with
        floats = ", ".join(f"{n:,}" for n in report["state_floats_per_sequence"])
        horizon = [f"horizon {report['horizon']}: state floats per sequence per layer {floats}"]
    return "\n".join([*lines, *reduction_lines(report["banks"]), line, *horizon])


def checkpoint_tokenizer(directory: str, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: its ``tokenizer.json``, or for older
    checkpoints the run's task (bytes for ``ByteCorpusLM``); ``ValueError`` if it has none."""
    saved = f"{directory.rstrip('/')}/{TOKENIZER_FILE}"
    has_file = epath.Path(saved).exists()
    task = task_from_record(meta["run"])
    tokenizer = load_tokenizer(saved) if has_file else task.text_tokenizer()
    if tokenizer is None:
        raise ValueError(
            f"{directory} has no {TOKENIZER_FILE} and its task "
            f"{meta['run']['task'].get('type')} has no text tokenizer: it does not model text"
        )
    return tokenizer


LM_HORIZON = "cap:0.001"
"""The distillation horizon of language models, chosen by ``experiments/streaming_eval.py``
(``lm_bytes_small``, 3 x 8 streams of 16 x 256 bytes, rows minus sliding-window attention on the
same streams): the eigenvalue cap ``a^L <= 0.001`` keeps every bucket up to 16x 0.09-0.12
bits/byte below attention, as inside the training window (the plain distilled model is 1.7
bits/byte above it from 4x on), within 0.01 bits/byte of ``restart:2`` (exact, 0.10-0.13 below),
at the plain LDS step's cost and state (43.0 against 44.6 us/token, same run; ``restart:2``
costs 68.8 us/token and twice the state, ``cutoff`` 93.6 and a window of inputs)."""


def default_horizon(record: dict[str, Any]) -> str:
    """The distillation horizon when none is given: :data:`LM_HORIZON` for a language model
    (token task), else ``"none"``."""
    return LM_HORIZON if task_from_record(record).kind == "tokens" else "none"


def distill_checkpoint(
    source: str,
    out: str,
    *,
    num_states: int = DEFAULT_NUM_STATES,
    arithmetic: Arithmetic = "plain",
    tol: float | None = DEFAULT_TOL,
    max_states: int | None = None,
    horizon: str | None = None,
) -> dict[str, Any]:
    """Distill every STU layer of the model in ``source`` into a new checkpoint in ``out``.

    ``horizon``: the memory horizon past the training length
    (:func:`~spectral_jax.nn.horizon.parse_distill_horizon`): ``restart:R`` is recorded and wraps
    the layers when the checkpoint is loaded; ``tail:W`` / ``cap:C`` change the bank's fit.
    None: :func:`default_horizon` of the checkpoint's run.

    Returns the report of :func:`distill_with_report`, which is also stored in ``out``'s
    metadata. ``out`` must not hold checkpoints yet (nothing is overwritten).
    """
    require_not_shards(source, "a checkpoint directory")
    require_not_shards(out, "an output directory for the distilled checkpoint")
    with Checkpointer(CheckpointConfig(source), read_only=True) as ckpt:
        if "distill" in ckpt.restore_meta():
            raise ValueError(f"{source} is already a distilled checkpoint")
    model, meta = load_model(source)
    horizon = default_horizon(meta["run"]) if horizon is None else horizon
    _, tail = parse_distill_horizon(horizon)
    distilled, report = distill_with_report(
        model,
        meta["run"],
        num_states=num_states,
        arithmetic=arithmetic,
        tol=tol,
        max_states=max_states,
        tail=tail,
    )
    policy = parse_distill_horizon(horizon)[0]
    streaming = set_horizon(nnx.clone(distilled), policy)  # as load_for_inference builds it
    report["horizon"] = horizon
    report["state_floats_per_sequence"] = state_floats(streaming, streaming.config.max_len)
    distill = {
        "num_states": num_states,
        "arithmetic": arithmetic,
        "tol": tol,
        "max_states": max_states,
        "blocks": layer_blocks(report["banks"]),
        "horizon": horizon,
        "source": source,
        "report": report,
    }
    with Checkpointer(CheckpointConfig(out, async_save=False, keep=1)) as ckpt:
        if ckpt.latest_step() is not None:
            raise ValueError(f"{out} already holds checkpoints; choose an empty directory")
        state = nnx.to_pure_dict(nnx.state(distilled))
        ckpt.save(meta["step"], state, None, {"run": meta["run"], "distill": distill})
        ckpt.wait()
        saved = epath.Path(source) / TOKENIZER_FILE
        if saved.exists():  # the distilled checkpoint carries the tokenizer too
            save_tokenizer(load_tokenizer(str(saved)), ckpt.directory)
    return report
