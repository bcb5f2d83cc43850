"""Metrics output: a progress line on stdout, a JSONL file, optional TensorBoard.

Only the primary process (index 0) writes. Every record is one JSON object per line
with at least ``{"split": "train" | "eval", "step": int}``; the file is appended to,
so a resumed run continues the same file (a ``{"event": "resume"}`` record marks
where). TensorBoard events are written when ``tensorboardX`` is importable and a
``tensorboard_dir`` is given.
"""

from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(record: dict[str, Any], total_steps: int, width: int = 20) -> str:
    """One line of progress for a train or eval record."""
    step = record["step"]
    if record["split"] == "eval":
        parts = [f"eval  step {step}"] + [
            f"{k} {v:.4f}" for k, v in sorted(record.items()) if k not in ("split", "step")
        ]
        return " | ".join(parts)
    filled = min(width, width * step // max(total_steps, 1))
    bar = "#" * filled + "." * (width - filled)
    parts = [
        f"[{bar}] {step}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"grad {record['grad_norm']:.3f}",
        f"lr {record['learning_rate']:.2e}",
    ]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "tokens_per_s_per_device" in record:
        parts.append(f"{record['tokens_per_s_per_device']:,.0f} tok/s/device")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "eta_s" in record:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def _tensorboard_writer(logdir: str | None):
    if logdir is None:
        return None
    try:
        module = importlib.import_module("tensorboardX")
    except ImportError:
        return None
    return module.SummaryWriter(logdir)


class MetricsLogger:
    """Writes records to stdout (progress), ``jsonl_path`` and TensorBoard."""

    def __init__(
        self,
        jsonl_path: str | None,
        total_steps: int,
        *,
        primary: bool = True,
        tensorboard_dir: str | None = None,
        stream: TextIO | None = None,
    ):
        self.total_steps = total_steps
        self.primary = primary
        self.stream = sys.stdout if stream is None else stream
        self._file = None
        self._tb = None
        if primary and jsonl_path is not None:
            path = pathlib.Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        if primary:
            self._tb = _tensorboard_writer(tensorboard_dir)

    def log(self, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.primary:
            return
        if echo and "split" in record:
            print(progress_line(record, self.total_steps), file=self.stream, flush=True)
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()
        if self._tb is not None and "split" in record:
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, int | float):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
