"""Flash STU checkpoints to spectral_jax checkpoints and back (``spectral-jax convert`` /
``spectral-jax export``).

A converted checkpoint is step 0 of a run: the imported model's state, a fresh optimizer state
for the run's optimizer, and the run record of ``run`` (a preset with overrides, its model
replaced by the imported one, the preset's ``remat`` kept), so ``generate`` and ``distill``
read it like a trained one and ``train`` with that preset, those overrides and the model fields
printed by :func:`convert` resumes from it: fine-tuning starts from the imported weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from spectral_jax.data.shards import require_not_shards
from spectral_jax.data.tokenizer import load_tokenizer, save_tokenizer
from spectral_jax.interop import flashstu
from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import (
    CheckpointConfig,
    Checkpointer,
    TrainConfig,
    load_for_inference,
    make_optimizer,
)
from spectral_jax.train.config import run_record

# set first, so that no override in between makes an invalid model (a head width that rotary
# embeddings cannot rotate, a shared mixture before its projection)
FIRST = ("attention_positions", "num_heads", "stu_projection", "stu_variant")


def model_overrides(config: ModelConfig, base: ModelConfig | None) -> list[str]:
    """``model.FIELD=VALUE`` overrides that turn ``base`` (a preset's model) into ``config``,
    applied one by one."""
    fields = dataclasses.asdict(config)
    before = {} if base is None else dataclasses.asdict(base)
    order = [*FIRST, *(k for k in fields if k not in FIRST)]
    return [f"model.{k}={fields[k]}" for k in order if k not in before or before[k] != fields[k]]


def convert(
    source: str,
    out: str,
    run: TrainConfig,
    *,
    tokenizer: str | None = None,
    norm_eps: float = flashstu.TORCH_RMSNORM_EPS,
    keep_phi: bool | None = None,
) -> tuple[flashstu.ImportReport, list[str]]:
    """Write the Flash STU checkpoint ``source`` (see :func:`spectral_jax.interop.flashstu.load`)
    as step 0 of ``run`` into the new directory ``out``, with ``tokenizer`` (a
    ``tokenizer.json``) saved beside it. Returns the import report and the ``--set`` overrides
    the preset needs for ``train`` to resume from it. ``ValueError`` if a tokenizer (the given
    one or the run's task's) has ids outside the model's vocabulary."""
    require_not_shards(out, "an output directory for the converted checkpoint")
    model, report = flashstu.read(source, norm_eps=norm_eps, keep_phi=keep_phi)
    vocab, seq_len = model.config.vocab_size, getattr(run.task, "seq_len", 0)
    if seq_len > model.config.max_len:
        raise ValueError(
            f"the run's task.seq_len={seq_len} exceeds the model's seq_len "
            f"{model.config.max_len}: pass --set task.seq_len={model.config.max_len}"
        )
    tokenizers = {"--tokenizer " + tokenizer: load_tokenizer(tokenizer)} if tokenizer else {}
    task_tokenizer = run.task.text_tokenizer()
    if task_tokenizer is not None:
        tokenizers["the run's task"] = task_tokenizer
    for name, tok in tokenizers.items():
        if tok.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer of {name} has {tok.vocab_size} ids, more than the model's "
                f"vocabulary of {vocab}: it is not the tokenizer this checkpoint was trained with"
            )
    if run.model is not None:  # remat changes how the run trains, not the model's function
        model.config = dataclasses.replace(model.config, remat=run.model.remat)
    overrides = model_overrides(model.config, run.model)
    run = dataclasses.replace(run, model=model.config)
    optimizer = nnx.Optimizer(model, make_optimizer(run.optim), wrt=nnx.Param)
    meta: dict[str, Any] = {
        "run": run_record(run),
        "data": {"seed": run.seed, "next_step": 0},
        "nonfinite": {"in_a_row": 0, "skipped_total": 0},
        "converted_from": str(source),
    }
    with Checkpointer(CheckpointConfig(out, async_save=False, keep=1)) as ckpt:
        if ckpt.latest_step() is not None:
            raise ValueError(f"{out} already holds checkpoints; choose an empty directory")
        model_state = nnx.to_pure_dict(nnx.state(model))
        ckpt.save(0, model_state, nnx.to_pure_dict(nnx.state(optimizer)), meta)
        ckpt.wait()
        if tokenizer:
            save_tokenizer(tokenizers["--tokenizer " + tokenizer], ckpt.directory)
    return report, overrides


def export(checkpoint: str, out: str) -> list[tuple[str, str]]:
    """Write the model of the spectral_jax checkpoint ``checkpoint`` in Flash STU's layout into
    ``out`` (:func:`spectral_jax.interop.flashstu.save`); returns the (variable, key) pairs."""
    model, _ = load_for_inference(checkpoint)
    return flashstu.save(model, out)
