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

Restoring "the latest" (``restore_latest``, ``restore_meta()``) falls back: a step whose
items fail to restore for any reason (truncated or missing files, unreadable or wrong
metadata, a missing item) is skipped for the next newest; once an older step restores, each
skipped one is reported with a warning and recorded in ``fallbacks``, and a writer moves its
directory aside to ``<directory>/corrupt/<step>-<UTC time>`` (a name orbax never lists, so no
later save touches it; a read-only user moves nothing). No good step at all is a
``CheckpointError`` naming each step's reason, and nothing is moved: then the likelier cause
is a run that does not fit the checkpoints (another model), not damage.

One writer per directory: a writer holds an exclusive ``fcntl.flock`` on
``<directory>/writer.lock`` (whose text names the holder's pid, host and start time)
until ``close``; a second writer fails at once naming the holder. The kernel releases
the lock when the holder dies, so a killed run leaves nothing stale. Only process 0 of
a multi-process run takes it, and ``gs://`` directories cannot be locked: there the
user must make sure only one run writes.

``directory`` may be a local path or a ``gs://bucket/path`` URL (orbax resolves it
through ``etils.epath``; the machine needs GCS credentials). Only local paths are
exercised by the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from spectral_jax.validation import positive_int

FORMAT_VERSION = 1
_ITEMS = ("model", "optimizer", "meta")
LOCK_FILE = "writer.lock"
CORRUPT_DIR = "corrupt"  # damaged steps are moved here; not a step name, so orbax ignores it


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, empty, corrupt, or does not fit the run."""


class _DamagedStep(CheckpointError):
    """One step's items failed to restore (the fall-back skips such a step)."""


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


def _root_cause(error: BaseException) -> str:
    """``"Type: first line"`` of the innermost cause (orbax wraps the reason in long dumps)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:500] if lines else ''}"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _lock_writer(directory: pathlib.Path):
    """An open file holding an exclusive ``flock`` on ``directory``'s lock file, naming
    this process; ``CheckpointError`` naming the holder if another writer has it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")  # held until the Checkpointer closes
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown holder"
        handle.close()
        raise CheckpointError(
            f"checkpoint directory {directory} is in use by another writer ({holder}); "
            "wait for that run to finish or stop it, or choose another directory"
        ) from None
    handle.truncate(0)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _utc_now()}
    handle.write(json.dumps(holder))
    handle.flush()
    return handle


class Checkpointer:
    """Save and restore training state in one directory; use as a context manager.

    ``read_only=True`` opens an existing directory for loading and raises
    ``CheckpointError`` when it is missing or holds no complete checkpoint; it takes no
    lock and never moves anything. A writer holds the directory's lock until ``close``.
    """

    def __init__(self, config: CheckpointConfig, *, read_only: bool = False):
        self.config = config
        self.read_only = read_only
        self.directory = _resolve(config.directory)
        self.fallbacks: list[dict[str, Any]] = []  # steps skipped: step, reason, moved_to
        self._lock = None
        if not _is_remote(self.directory):
            path = pathlib.Path(self.directory)
            if path.exists() and not path.is_dir():
                raise CheckpointError(f"checkpoint path {path} exists but is not a directory")
            if read_only and not path.is_dir():
                raise CheckpointError(
                    f"checkpoint directory {path} does not exist: pass the directory that "
                    "`spectral-jax train --checkpoint-dir` wrote"
                )
            if not read_only and jax.process_index() == 0:
                self._lock = _lock_writer(path)  # before orbax cleans temporary directories
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
            self._release_lock()
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
        """Steps of the complete checkpoints, ascending (damaged ones skipped in place,
        by a read-only user, excluded; moved ones are gone and their step can be saved anew)."""
        skipped = {f["step"] for f in self.fallbacks if f["moved_to"] is None}
        return sorted(s for s in self._manager.all_steps() if s not in skipped)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

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
        """The JSON metadata of ``step`` (default: the newest step whose metadata restores,
        falling back as described in the module docstring)."""
        if step is None:
            return self._newest_good(self._read_meta)
        return self._read_meta(self._require_step(step))

    def restore_latest(self, abstracts: Callable[[dict[str, Any]], tuple[Any, Any]]):
        """Restore the newest step that restores completely, falling back past damaged ones.

        ``abstracts(meta) -> (abstract_model, abstract_optimizer)`` gives the shapes for a
        step from its metadata (see ``restore``); an exception it raises (the checkpoint
        does not fit the run) propagates unchanged. Returns ``(model, optimizer, meta)``.
        """

        def attempt(step: int):
            return self._restore_step(step, *abstracts(self._read_meta(step)))

        return self._newest_good(attempt)

    def restore(self, abstract_model, abstract_optimizer=None, step: int | None = None):
        """Restore ``step`` (default: latest, with fall-back) into the given shapes, dtypes
        and shardings.

        ``abstract_model`` / ``abstract_optimizer``: pytrees of ``jax.ShapeDtypeStruct``
        (with ``sharding``) matching what was saved; pass ``abstract_optimizer=None``
        to load only the model (inference). Returns ``(model, optimizer, meta)``.
        """
        if step is None:
            return self.restore_latest(lambda meta: (abstract_model, abstract_optimizer))
        return self._restore_step(self._require_step(step), abstract_model, abstract_optimizer)

    def wait(self) -> None:
        """Block until every pending save is complete; raise if one failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _require_step(self, step: int) -> int:
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory}; have {steps}"
            )
        return step

    def _newest_good(self, attempt: Callable[[int], Any]):
        """``attempt(step)`` for the newest step where restoring does not fail. Once one
        succeeds, each newer step that failed is warned about, recorded in ``fallbacks`` and
        (writers) moved aside. When no step restores, nothing is moved: the likelier cause is
        then a run that does not fit these checkpoints, and the error names every reason."""
        failed = []
        for step in reversed(self.all_steps()):
            try:
                result = attempt(step)
            except _DamagedStep as e:
                failed.append((step, str(e)))
                continue
            for bad, reason in failed:
                self._set_aside(bad, reason)
            return result
        if not failed:
            raise CheckpointError(f"checkpoint directory {self.directory} holds no checkpoint")
        raise CheckpointError(
            f"checkpoint directory {self.directory} holds no good checkpoint (nothing was "
            "moved; if the files are intact, the run may not fit them): "
            + "; ".join(f"step {step}: {reason}" for step, reason in failed)
        )

    def _set_aside(self, step: int, reason: str) -> None:
        moved_to = None
        if not self.read_only and jax.process_index() == 0:
            source = epath.Path(self.directory) / str(step)  # orbax's default step name
            target = epath.Path(self.directory) / CORRUPT_DIR / f"{step}-{_utc_now()}"
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            moved_to = str(target)
            self._manager.reload()
        action = f"moved to {moved_to}" if moved_to else "skipped (read-only: not moved)"
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is damaged and was {action}; "
            f"trying the next newest step. Reason: {reason}",
            stacklevel=4,
        )
        self.fallbacks.append({"step": step, "reason": reason, "moved_to": moved_to})

    def _read_meta(self, step: int) -> dict[str, Any]:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def _restore_step(self, step: int, abstract_model, abstract_optimizer):
        items = {
            "model": ocp.args.StandardRestore(abstract_model),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(abstract_optimizer)
        restored = self._restore(step, **items)
        return restored["model"], restored.get("optimizer"), restored["meta"]

    def _restore(self, step: int, **items):
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for unreadable/mismatched files
            raise _DamagedStep(
                f"checkpoint step {step} in {self.directory} could not be restored: it is "
                f"corrupt or was written by a different model/optimizer ({_root_cause(e)})"
            ) from e
        meta = restored["meta"]
        if not isinstance(meta, dict):
            raise _DamagedStep(
                f"checkpoint step {step} in {self.directory} has no readable metadata"
            )
        if meta.get("format_version") != FORMAT_VERSION or meta.get("step") != step:
            raise _DamagedStep(
                f"checkpoint step {step} in {self.directory} has unexpected metadata "
                f"(format_version={meta.get('format_version')}, step={meta.get('step')}); "
                f"expected format_version={FORMAT_VERSION}, step={step}"
            )
        return restored


def abstract_like(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (same tree structure)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
