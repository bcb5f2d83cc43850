"""Checkpoints: an orbax ``CheckpointManager`` with three items per step.

- ``model``: the model's full nnx state (parameters and any RNG streams), a pure dict.
- ``optimizer``: the ``nnx.Optimizer`` state (step count and optax state), a pure dict.
- ``meta``: JSON: the step, the data position (seed and next batch index), the run's
  configuration, and a format version.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices
and the files are written in a background thread. Orbax writes each step into a
temporary directory and renames it (local file systems) or writes a commit marker
(``gs://`` buckets) only when every item is complete, so a process killed in the
middle of a save leaves nothing that ``latest_step`` reports; partial directories
are removed when a writer opens the directory again.

``directory`` may be a local path or a ``gs://bucket/path`` URL (orbax resolves it
through ``etils.epath``; the machine needs GCS credentials). Only local paths are
exercised by the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from spectral_jax.validation import positive_int

FORMAT_VERSION = 1
_ITEMS = ("model", "optimizer", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty, corrupt, or does not fit the run."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str
    save_every: int = 1000  # steps between saves; the last step is always saved
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True

    def __post_init__(self):
        if not isinstance(self.directory, str) or not self.directory:
            raise ValueError(f"directory must be a non-empty path or URL, got {self.directory!r}")
        positive_int("CheckpointConfig", "save_every", self.save_every)
        positive_int("CheckpointConfig", "keep", self.keep)


def _is_remote(directory: str) -> bool:
    return "://" in directory


def _resolve(directory: str) -> str:
    return directory if _is_remote(directory) else str(pathlib.Path(directory).absolute())


class _DropReadOnlyNotice(logging.Filter):
    """Drops orbax's "Given directory is read only" warning: opening a directory read-only is
    exactly what ``Checkpointer(read_only=True)`` asks for, so it is not worth a warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
    """Within the block, orbax's read-only notice (logged through absl) is dropped."""
    logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class Checkpointer:
    """Save and restore training state in one directory; use as a context manager.

    ``read_only=True`` opens an existing directory for loading and raises
    ``CheckpointError`` when it is missing or holds no complete checkpoint.
    """

    def __init__(self, config: CheckpointConfig, *, read_only: bool = False):
        self.config = config
        self.directory = _resolve(config.directory)
        if not _is_remote(self.directory):
            path = pathlib.Path(self.directory)
            if path.exists() and not path.is_dir():
                raise CheckpointError(f"checkpoint path {path} exists but is not a directory")
            if read_only and not path.is_dir():
                raise CheckpointError(f"checkpoint directory {path} does not exist")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,
            max_to_keep=None if read_only else config.keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=config.async_save,
        )
        try:
            with _quiet_read_only_notice():
                self._manager = ocp.CheckpointManager(
                    self.directory, item_names=_ITEMS, options=options
                )
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {type(e).__name__}: {e}"
            ) from e
        if read_only and self.latest_step() is None:
            raise CheckpointError(
                f"checkpoint directory {self.directory} holds no complete checkpoint"
            )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, model_state, optimizer_state, meta: dict[str, Any]) -> None:
        """Start saving ``step`` (returns before the files are written when async).

        ``model_state`` / ``optimizer_state``: pytrees (pure dicts) of ``jax.Array``;
        ``optimizer_state=None`` saves a model for inference only.
        """
        meta = {**meta, "step": step, "format_version": FORMAT_VERSION}
        items = {"model": ocp.args.StandardSave(model_state), "meta": ocp.args.JsonSave(meta)}
        if optimizer_state is not None:
            items["optimizer"] = ocp.args.StandardSave(optimizer_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: latest)."""
        step = self._require_step(step)
        restored = self._restore(step, meta=ocp.args.JsonRestore())
        return restored["meta"]

    def restore(self, abstract_model, abstract_optimizer=None, step: int | None = None):
        """Restore ``step`` (default: latest) into the given shapes, dtypes and shardings.

        ``abstract_model`` / ``abstract_optimizer``: pytrees of ``jax.ShapeDtypeStruct``
        (with ``sharding``) matching what was saved; pass ``abstract_optimizer=None``
        to load only the model (inference). Returns ``(model, optimizer, meta)``.
        """
        step = self._require_step(step)
        items = {
            "model": ocp.args.StandardRestore(abstract_model),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(abstract_optimizer)
        restored = self._restore(step, **items)
        meta = restored["meta"]
        if meta.get("format_version") != FORMAT_VERSION or meta.get("step") != step:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has unexpected metadata "
                f"(format_version={meta.get('format_version')}, step={meta.get('step')}); "
                f"expected format_version={FORMAT_VERSION}, step={step}"
            )
        return restored["model"], restored.get("optimizer"), meta

    def wait(self) -> None:
        """Block until every pending save is complete; raise if one failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _require_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"checkpoint directory {self.directory} holds no checkpoint")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory}; have {steps}"
            )
        return step

    def _restore(self, step: int, **items):
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for unreadable/mismatched files
            steps = self.all_steps()
            older = [s for s in steps if s < step]
            hint = (
                f"; delete that step's directory to resume from step {older[-1]}" if older else ""
            )
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored: it is "
                f"corrupt or was written by a different model/optimizer "
                f"({type(e).__name__}: {e}){hint}"
            ) from e


def abstract_like(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (same tree structure)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
