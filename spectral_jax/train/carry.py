"""Carried-state training ("state passing"): consecutive windows of one stream, in order.

Window ``k`` of a stream runs from the decode cache that window ``k - 1`` left (every layer's
state: a distilled LDS layer's recurrent state and AR histories, an attention layer's K/V ring
buffer), with its gradient stopped, so a window's loss trains the model to use the context
before it while memory and backpropagation stay those of one window.
"""

from __future__ import annotations

import jax
from flax import nnx


def stop_cache(cache):
    """``cache`` (any pytree, e.g. a ``ModelCache``) with the gradient stopped at every leaf."""
    return jax.tree.map(jax.lax.stop_gradient, cache)


def check_carry_model(model: nnx.Module, length: int) -> None:
    """Raise ValueError unless ``model`` can be trained on carried caches of ``length``
    consecutive positions: it needs ``prefill(x, cache=...)`` and ``init_cache`` (a
    ``SpectralModel``), and every layer must run ``length`` positions (``check_length``)."""
    missing = [
        name for name in ("prefill", "init_cache", "check_length") if not hasattr(model, name)
    ]
    if missing:
        raise ValueError(
            f"carried-state training needs a model with prefill(x, cache=...) and init_cache, "
            f"like SpectralModel; {type(model).__name__} has no {', '.join(missing)}"
        )
    model.check_length(length, f"carried-state training over {length} consecutive positions")


def check_carry_config(config, model: nnx.Module) -> None:
    """Raise ValueError unless ``config`` (a ``TrainConfig`` with ``carry_windows > 1``) can
    train ``model`` on carried caches: a task with ``stream_window``, one microbatch, ``steps``
    and ``checkpoint.save_every`` multiples of ``carry_windows`` (checkpoints fall on group
    starts, where the caches are empty: resume stays exact), and a model that runs the group's
    ``carry_windows * seq_len`` positions (``check_carry_model``)."""
    windows = config.carry_windows
    if not hasattr(config.task, "stream_window"):
        raise ValueError(
            f"carry_windows={windows} needs a task that serves consecutive windows "
            f"(stream_window, e.g. ByteCorpusLM or TokenShardLM); {type(config.task).__name__} "
            "has none: set carry_windows=1"
        )
    every = {"steps": config.steps}
    if config.checkpoint is not None:
        every["checkpoint.save_every"] = config.checkpoint.save_every
    for name, value in every.items():
        if value % windows:
            raise ValueError(
                f"carry_windows={windows}: {name}={value} must be a multiple of it, so that "
                "checkpoints fall on the start of a group of windows (resume stays exact)"
            )
    if config.microbatches != 1:
        raise ValueError(
            f"carry_windows={windows} runs each window in one piece: set microbatches=1, got "
            f"{config.microbatches}"
        )
    check_carry_model(model, windows * config.task.seq_len)
