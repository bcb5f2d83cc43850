"""Restoring models from checkpoints: a trained one (``load_model``, without its optimizer) or a
trained or distilled one (``load_for_inference``), onto a mesh or one device."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from spectral_jax.data.shards import require_not_shards
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.horizon import parse_distill_horizon, set_horizon
from spectral_jax.nn.model import SpectralModel
from spectral_jax.train import sharding as shd
from spectral_jax.train.checkpoint import CheckpointConfig, Checkpointer, abstract_like
from spectral_jax.train.config import ModelFn, model_config_from_record, spectral_model_fn


def abstract_pure(state, shardings):
    """The pure-dict abstract arrays of an nnx ``state`` placed by ``shardings``."""
    return abstract_like(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))


def load_model(
    directory: str,
    *,
    step: int | None = None,
    model_fn: ModelFn | None = None,
    mesh: shd.MeshConfig | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Restore a trained model (without its optimizer) for inference.

    Rebuilds ``SpectralModel`` from the ``ModelConfig`` recorded in the checkpoint
    (or uses ``model_fn`` for a custom model) and loads ``step`` (default: latest)
    onto ``mesh`` (default: all devices, FSDP off). Returns ``(model, meta)`` where
    ``meta["run"]`` is the run record (task, model, optimizer, seed, batch).
    """
    device_mesh = shd.make_mesh(mesh or shd.MeshConfig())
    templates = []  # (graphdef, state) of the model built for the step being restored

    def abstracts(meta):
        build = model_fn or spectral_model_fn(model_config_from_record(meta["run"]))
        templates.append(nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0)))))
        state = templates[-1][1]
        return abstract_pure(state, shd.state_shardings(state, device_mesh)), None

    with Checkpointer(CheckpointConfig(directory), read_only=True) as ckpt:
        if step is None:  # the newest good step, skipping damaged ones with a warning
            pure, _, meta = ckpt.restore_latest(abstracts)
        else:
            pure, _, meta = ckpt.restore(*abstracts(ckpt.restore_meta(step)), step=step)
    graphdef, state = templates[-1]
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), meta


def _distilled_template(record: dict[str, Any], distill: dict[str, Any] | None) -> nnx.Module:
    model = SpectralModel(model_config_from_record(record), rngs=nnx.Rngs(0))
    if distill is None:
        return model
    # checkpoints written before the reduction have no blocks: every layer unreduced
    if "slots" in distill and "blocks" not in distill:
        raise ValueError(
            "this distilled checkpoint was written with the earlier single-group reduced layout "
            "(slots per layer), which this version no longer reads; distill its source "
            "checkpoint again with `spectral-jax distill`"
        )
    blocks = distill.get("blocks")
    _, tail = parse_distill_horizon(distill.get("horizon", "none"))
    return distill_model(
        model,
        num_states=distill["num_states"],
        arithmetic=distill["arithmetic"],
        tol=None if blocks is None else DEFAULT_TOL,
        blocks=blocks,
        tail=tail,
    ).model


def load_for_inference(directory: str) -> tuple[nnx.Module, dict[str, Any]]:
    """Load the latest checkpoint in ``directory``, trained or distilled: ``(model, meta)``."""
    require_not_shards(directory, "a checkpoint directory")
    with Checkpointer(CheckpointConfig(directory), read_only=True) as ckpt:
        meta = ckpt.restore_meta()
        if "distill" not in meta:
            return load_model(directory)
        model = _distilled_template(meta["run"], meta["distill"])
        state = nnx.state(model)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state)
        )
        pure, _, meta = ckpt.restore(abstract)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    # the arrays are saved unwrapped; the restart policy wraps the restored layers
    return set_horizon(
        model, parse_distill_horizon(meta["distill"].get("horizon", "none"))[0]
    ), meta
