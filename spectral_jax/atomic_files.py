"""Files that are never half-written: write to a temporary file in the same directory, flush it
to disk, then :func:`os.replace` it into place. A reader (or a run killed mid-write) sees either
the old file, or no file, or the complete new one; the temporary file is removed on any error.

Every result, cache entry, manifest and shard that spectral_jax writes goes through
:func:`write_atomic` (orbax handles checkpoints the same way).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes to a binary file object;
    parent directories are created. The file gets the mode a plain ``open`` would give it
    (``0o666`` less the umask; the temporary file's own ``0o600`` is not kept). Returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Create or replace ``path`` with ``data`` atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Create or replace the UTF-8 text file ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """Create or replace ``path`` with ``value`` as indented JSON (and a final newline)."""
    return write_text_atomic(path, json.dumps(value, indent=2) + "\n")
