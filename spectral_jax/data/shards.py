"""A directory of token shards, read as one token stream per split.

Two layouts are read as they are:

- ``prepare-data`` output: ``manifest.json`` (format, version, dtype, tokenizer, per split the
  token, document and byte counts and the shard list), ``tokenizer.json``, and 1-D ``.npy``
  shards ``train_00000.npy``, ``val_00000.npy``, ...;
- a flash-stu-2 directory: 1-D integer ``.npy`` files whose names contain ``train`` or ``val``
  (no manifest; the tokenizer is given separately).

Shards are opened lazily and read through ``np.load(mmap_mode="r")`` for local paths, or by
byte ranges (``fsspec``, e.g. ``gs://`` with the ``gcs`` extra) for URLs: a window never loads a
whole shard. A truncated or malformed shard raises ``ShardError`` naming the file.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
PLAN = "prepare.json"  # written first by prepare-data; without a manifest: an unfinished run
FORMAT = "spectral_jax.token_shards"
VERSION = 1
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard directory or shard file is missing, unfinished, truncated or malformed."""


def _is_url(path: str) -> bool:
    return "://" in path


class _Files:
    """Listing and reading of a local directory or a URL prefix."""

    def __init__(self, root: str):
        self.root = root
        if _is_url(root):
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(root)
        else:
            self.fs, self.base = None, root

    def join(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        if self.fs is None:
            return (pathlib.Path(self.base) / name).exists()
        return self.fs.exists(self.join(name))

    def is_dir(self) -> bool:
        return pathlib.Path(self.base).is_dir() if self.fs is None else self.fs.isdir(self.base)

    def names(self) -> list[str]:
        if self.fs is None:
            return sorted(p.name for p in pathlib.Path(self.base).iterdir() if p.is_file())
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.base, False))

    def read_text(self, name: str) -> str:
        if self.fs is None:
            return (pathlib.Path(self.base) / name).read_text(encoding="utf-8")
        return self.fs.cat_file(self.join(name)).decode("utf-8")

    def open_array(self, name: str):
        """A 1-D array-like of shard ``name``: ``np.memmap`` or byte-range reads."""
        where = f"{self.root.rstrip('/')}/{name}"
        try:
            if self.fs is None:
                array = np.load(pathlib.Path(self.base) / name, mmap_mode="r")
            else:
                array = _RangeArray(self.fs, self.join(name))
        except (ValueError, OSError, EOFError) as err:
            raise ShardError(f"shard {where} is truncated or not a .npy file: {err}") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ShardError(
                f"shard {where} must be a 1-D integer array, got shape {array.shape} "
                f"dtype {array.dtype}"
            )
        return array


class _RangeArray:
    """A 1-D ``.npy`` file on a remote file system, read by byte ranges."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not supported")
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays are not token shards")
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)
        expected = self.offset + int(np.prod(shape)) * self.dtype.itemsize
        if fs.size(path) < expected:
            raise ValueError(f"the file has {fs.size(path)} bytes, its header needs {expected}")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        size = self.dtype.itemsize
        data = self.fs.cat_file(
            self.path, start=self.offset + start * size, end=self.offset + stop * size
        )
        return np.frombuffer(data, self.dtype)


class SplitStream:
    """The shards of one split as one stream of ``tokens`` ids.

    ``files``: shard names; ``starts``: [n + 1] the first token of each shard in the stream.
    """

    def __init__(self, files: _Files, names: list[str], lengths: list[int] | None):
        self._files, self.names = files, names
        self._arrays: dict[int, Any] = {}
        self.lengths = lengths
        if lengths is None:  # no manifest: read each header for its length
            lengths = [len(self.shard(i)) for i in range(len(names))]
            self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    def shard(self, i: int):
        """The array-like of shard ``i`` (opened on first use): ``np.memmap`` or byte ranges."""
        if i not in self._arrays:
            array = self._files.open_array(self.names[i])
            if self.lengths is not None and len(array) != self.lengths[i]:
                raise ShardError(
                    f"shard {self._files.root}/{self.names[i]} holds {len(array)} tokens, "
                    f"the manifest says {self.lengths[i]}: it is truncated or was replaced"
                )
            self._arrays[i] = array
        return self._arrays[i]

    def read(self, start: int, length: int, vocab_size: int | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int32 ([length]), across shards.

        With ``vocab_size``, an id outside ``[0, vocab_size)`` is a ``ShardError`` naming the
        shard (a corrupt shard, or a tokenizer that does not fit the data).
        """
        if not 0 <= start and start + length <= self.tokens:
            raise ValueError(f"window [{start}, {start + length}) is outside [0, {self.tokens})")
        out = np.empty(length, np.int32)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.starts[i])
            hi = min(int(self.lengths[i]), lo + length - done)
            piece = np.asarray(self.shard(i)[lo:hi])
            if vocab_size is not None and piece.size and int(piece.max()) >= vocab_size:
                raise ShardError(
                    f"shard {self._files.root}/{self.names[i]} holds id {int(piece.max())} "
                    f">= vocab_size {vocab_size}: it is corrupt or was written with another "
                    "tokenizer"
                )
            out[done : done + hi - lo] = piece
            done += hi - lo
            i += 1
        return out


class ShardDirectory:
    """``splits["train" | "val"]``: a ``SplitStream``; ``manifest``: dict, or ``None`` for a
    flash-stu-2 directory."""

    def __init__(self, path: str):
        files = _Files(path)
        if not files.is_dir():
            raise ShardError(
                f"token shard directory {path} does not exist: write one with "
                "`spectral-jax prepare-data INPUT... --out DIR` and set task.path=DIR"
            )
        self.path = path
        self.manifest = read_manifest(path)
        self.splits: dict[str, SplitStream] = {}
        if self.manifest is not None:
            for split in SPLITS:
                shards = [s for s in self.manifest["splits"][split]["shards"] if s["tokens"]]
                names = [s["file"] for s in shards]
                self.splits[split] = SplitStream(files, names, [s["tokens"] for s in shards])
            return
        if files.exists(PLAN):
            raise ShardError(
                f"{path} holds an unfinished prepare-data run (no {MANIFEST} yet): re-run the "
                "same prepare-data command to finish it"
            )
        names = [n for n in files.names() if n.endswith(".npy")]
        for split in SPLITS:
            chosen = [n for n in names if split in n]
            if not chosen:
                raise ShardError(
                    f"{path} has no {MANIFEST} and no .npy shard named *{split}*: it is neither "
                    "a prepare-data output nor a flash-stu-2 shard directory"
                )
            self.splits[split] = SplitStream(files, chosen, None)
        both = set(self.splits["train"].names) & set(self.splits["val"].names)
        if both:
            raise ShardError(f"{path}: shards {sorted(both)} name both train and val")

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return None if self.manifest is None else self.manifest["tokenizer"]["fingerprint"]


def require_not_shards(path: str, expected: str) -> None:
    """``ValueError`` if ``path`` is a token shard directory, where ``expected`` (e.g. "a
    checkpoint directory") was asked for: nothing is read from or written into it."""
    files = _Files(path)
    if files.is_dir() and (files.exists(MANIFEST) or files.exists(PLAN)):
        raise ValueError(
            f"{path} is a token shard directory (prepare-data output), not {expected}: "
            "pass the directory that `spectral-jax train --checkpoint-dir` wrote"
        )


def check_shard_name(where: str, name: Any) -> None:
    """``ShardError`` unless ``name``, a shard file named in the record ``where`` (a manifest
    or a prepare-data part), is a plain file name beside it (no ``..``, no directory)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ShardError(
            f"{where} names shard {name!r}, which leaves its directory: a shard record may "
            "only name files beside it; re-run prepare-data into a new directory"
        )


def read_manifest(path: str) -> dict | None:
    """The manifest of a prepare-data directory, checked; ``None`` if there is none."""
    files = _Files(path)
    if not files.exists(MANIFEST):
        return None
    try:
        manifest = json.loads(files.read_text(MANIFEST))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}/{MANIFEST} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(
            f"{path}/{MANIFEST} has format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this reader needs {FORMAT!r} version {VERSION}"
        )
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            check_shard_name(f"{path}/{MANIFEST}", shard["file"])
    return manifest


@functools.lru_cache(maxsize=8)
def open_shards(path: str) -> ShardDirectory:
    """The shard directory at ``path`` (cached: shards stay mapped)."""
    return ShardDirectory(path)
