"""What every stage of ``device_check.py`` is given and may raise (``from device_run import
...``: the scripts run as ``python experiments/NAME.py``, so this folder is on the path).

A stage is a :class:`Stage`: ``run(ctx)`` measures, hands each row to ``ctx.record`` as soon as
it has it (the check rewrites its JSON then, and :class:`OverBudget` comes back once the stage's
deadline has passed), and returns the stage's note. It raises :class:`Skipped` when it does not
apply (the note says why), :class:`Reinstalled` when it installed jax for the accelerator (the
check re-executes itself), and any other exception when it fails. ``row_keys`` are the keys of
every row it records, the same on a CPU and on an accelerator.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple


class OverBudget(Exception):
    """The stage's deadline has passed (raised by :meth:`StageRun.record`)."""


class Skipped(Exception):
    """The stage does not apply here; the message says why."""


class Reinstalled(Exception):
    """jax for the accelerator was installed: the check must re-execute itself to load it."""


class StageRun:
    """What a running stage gets: the sizes (``tiny``), whether the CPU is forced (``cpu``), its
    wall-clock ``deadline`` (``time.time()``) and ``record``."""

    def __init__(
        self, tiny: bool, cpu: bool, deadline: float, save: Callable[[list[dict]], None]
    ) -> None:
        self.tiny, self.cpu, self.deadline = tiny, cpu, deadline
        self.rows: list[dict] = []
        self.save = save

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.time()

    def record(self, row: dict) -> None:
        """Add ``row`` and save; raise :class:`OverBudget` past the deadline."""
        if row:
            self.rows.append(row)
            self.save(self.rows)
        if self.left() <= 0:
            raise OverBudget


class Stage(NamedTuple):
    """One stage: ``budget_s`` (full sizes) and ``tiny_budget_s`` are its wall-time budgets;
    it is skipped when less than a quarter of its budget is left of the run's."""

    name: str
    run: Callable[[StageRun], str]
    budget_s: float
    tiny_budget_s: float
    row_keys: tuple[str, ...]


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def restore_env(name: str, value: str | None) -> None:
    """Set ``name`` back to ``value`` (None: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
