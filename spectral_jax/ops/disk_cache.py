"""On-disk cache for deterministic float64 arrays (spectral filters, LDS banks).

Entries are pickle-free ``.npz`` files in :func:`cache_dir`, written atomically
(:mod:`spectral_jax.atomic_files`), so a concurrent reader sees either no file or a complete
one. A file that cannot be read is recomputed and replaced.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spectral_jax.atomic_files import write_atomic

ENV_VAR = "SPECTRAL_JAX_CACHE"


def cache_dir() -> Path | None:
    """Directory of the cache: ``$SPECTRAL_JAX_CACHE``, else ``$XDG_CACHE_HOME/spectral_jax``,
    else ``~/.cache/spectral_jax``. Setting ``SPECTRAL_JAX_CACHE`` to an empty string or ``off``
    disables the on-disk cache (returns None)."""
    override = os.environ.get(ENV_VAR)
    if override is not None:
        return None if override.strip().lower() in ("", "off") else Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spectral_jax"


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (:func:`spectral_jax.atomic_files.write_atomic`)."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of a pickle-free ``.npz`` file into memory."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def cached_arrays(name: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``name`` (a file name ending in ``.npz`` that encodes every
    input the result depends on), computing and storing them on a miss.

    Returned arrays are read-only so a caller cannot corrupt a shared result.
    """
    directory = cache_dir()
    path = None if directory is None else directory / name
    arrays = None
    if path is not None and path.exists():
        try:
            arrays = load_npz(path)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            warnings.warn(f"unreadable cache file {path} ({err}); recomputing", stacklevel=2)
    if arrays is None:
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        if path is not None:
            try:
                save_npz_atomic(path, arrays)
            except OSError as err:
                warnings.warn(f"could not write cache file {path} ({err})", stacklevel=2)
    for value in arrays.values():
        value.setflags(write=False)
    return arrays
