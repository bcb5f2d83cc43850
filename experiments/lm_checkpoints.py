"""Checkpoints the experiments read, made on demand: ``lm_bytes_small`` runs (trained unless the
directory already holds a checkpoint) and distilled copies of them.

``experiments/distill_lm.py`` and ``experiments/streaming_eval.py`` import it (scripts run as
``python experiments/NAME.py``, so this folder is on the path).
"""

from __future__ import annotations

import dataclasses
import time

from spectral_jax.apps.inference import distill_checkpoint
from spectral_jax.train import CheckpointConfig, Checkpointer, CheckpointError, train
from spectral_jax.train.presets import apply_overrides, lm_bytes_small

SAVE_EVERY = 500


def has_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds a readable checkpoint."""
    try:
        with Checkpointer(CheckpointConfig(directory), read_only=True):
            return True
    except CheckpointError:
        return False


def step_overrides(steps: int) -> list[str]:
    """Overrides that shorten (or lengthen) ``lm_bytes_small`` to ``steps`` steps: warmup a
    tenth of them (at most 100), the cosine decay over all of them, one evaluation at the end."""
    warmup = min(100, max(1, steps // 10))
    return [f"steps={steps}", f"optim.warmup_steps={warmup}", f"optim.decay_steps={steps + 1}",
            f"eval_every={steps}"]  # fmt: skip


def ensure_trained(directory: str, overrides: list[str] = (), steps: int | None = None) -> None:
    """Train ``lm_bytes_small`` with ``overrides`` (``key=value``, as ``spectral-jax train
    --set`` takes them; ``steps``: :func:`step_overrides` after them) into ``directory``, with
    a checkpoint every :data:`SAVE_EVERY` steps (rounded down to a multiple of
    ``carry_windows``; at the end, if sooner), unless
    ``directory`` holds a checkpoint already."""
    if has_checkpoint(directory):
        return
    overrides = [*overrides, *([] if steps is None else step_overrides(steps))]
    config = apply_overrides(lm_bytes_small(), overrides)
    windows = config.carry_windows  # carried-state runs save on the start of a group
    save_every = min(SAVE_EVERY - SAVE_EVERY % windows, config.steps)
    print(f"no checkpoint in {directory}: training lm_bytes_small {overrides} there first")
    start = time.perf_counter()
    train(dataclasses.replace(config, checkpoint=CheckpointConfig(directory, save_every)))
    print(f"trained in {time.perf_counter() - start:.0f} s")


def ensure_distilled(source: str, directory: str, horizon: str) -> None:
    """Distill the checkpoint in ``source`` as ``spectral-jax distill --horizon HORIZON`` does
    (default states and tolerance) into ``directory``, unless it holds a checkpoint already."""
    if has_checkpoint(directory):
        return
    print(f"no checkpoint in {directory}: distilling {source} there (horizon {horizon})")
    distill_checkpoint(source, directory, horizon=horizon)
