"""Language-model tasks: next-byte prediction on the standard library, next-token prediction
on token shards (the :class:`~spectral_jax.data.tasks.Task` protocol and its row generators
are in :mod:`spectral_jax.data.tasks`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import pathlib
import zlib
from typing import NamedTuple

import numpy as np

from spectral_jax.data import sources
from spectral_jax.data.shards import ShardDirectory, open_shards
from spectral_jax.data.tasks import Batch, Split, row_rng, rows_array
from spectral_jax.data.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
)
from spectral_jax.validation import int_in_range, positive_int

# --------------------------------------------------------------------------- byte corpus


class ByteCorpus(NamedTuple):
    """The standard-library corpus: ``train``/``valid`` byte streams ([N] uint8)."""

    train: np.ndarray
    valid: np.ndarray
    num_train_files: int
    num_valid_files: int
    fingerprint: str  # sha256 of the file list and contents; equal on identical Pythons


def stdlib_corpus(val_percent: int) -> ByteCorpus:
    """The running Python's standard-library ``.py`` sources, split by file.

    Files are listed in sorted order of their path relative to the stdlib root
    (test directories and installed packages excluded) and concatenated; a file goes
    to validation when ``crc32(relative path) % 100 < val_percent``, a split that
    does not move when files are added or removed elsewhere.
    """
    return _load_stdlib_corpus(str(sources.stdlib_root()), val_percent)


@functools.lru_cache(maxsize=2)
def _load_stdlib_corpus(root: str, val_percent: int) -> ByteCorpus:
    root_path = pathlib.Path(root)
    rel_paths = [p.relative_to(root_path).as_posix() for p in sources.stdlib_files(root_path)]
    train, valid = [], []
    digest = hashlib.sha256()
    for rel in rel_paths:
        data = (root_path / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        (valid if zlib.crc32(rel.encode()) % 100 < val_percent else train).append(data)
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)  # noqa: E731
    return ByteCorpus(as_array(train), as_array(valid), len(train), len(valid), digest.hexdigest())


@dataclasses.dataclass(frozen=True)
class ByteCorpusLM:
    """Next-byte prediction (vocabulary 256) on the standard-library corpus.

    Each row is a window of ``seq_len + 1`` bytes at an offset drawn from the row's
    generator; inputs are the first ``seq_len`` bytes, targets the last ``seq_len``.
    The eval split draws its windows from the held-out files.
    """

    seq_len: int = 256
    val_percent: int = 5

    kind = "tokens"
    vocab_size = 256

    def __post_init__(self):
        positive_int("ByteCorpusLM", "seq_len", self.seq_len)
        int_in_range("ByteCorpusLM", "val_percent", self.val_percent, 1, 50)

    def corpus(self) -> ByteCorpus:
        return stdlib_corpus(self.val_percent)

    def text_tokenizer(self) -> Tokenizer:
        return ByteTokenizer()

    def eval_metrics(self, mean_loss: float) -> dict[str, float]:
        """Bits per byte: one token is one byte."""
        return {"bits_per_byte": mean_loss / math.log(2)}

    def batch(self, seed: int, step: int, rows, split: Split = "train") -> Batch:
        return self.stream_window(seed, step, 0, 1, rows, split)

    def stream_window(
        self, seed: int, group: int, window: int, windows: int, rows, split: Split = "train"
    ) -> Batch:
        """Window ``window`` of ``windows`` consecutive ones (inputs ``[B, seq_len]``): each row
        reads a stream of ``windows * seq_len + 1`` bytes at an offset drawn from the row's
        generator of step ``group``, so window ``k + 1`` continues where window ``k`` ended.
        ``windows=1`` is ``batch(seed, group, rows, split)``."""
        rows = rows_array(rows)
        corpus = self.corpus()
        stream = corpus.train if split == "train" else corpus.valid
        span = _check_window("ByteCorpusLM", self.seq_len, window, windows)
        if stream.size < span + 2:
            raise ValueError(
                f"the {split} corpus has {stream.size} bytes, too few for {windows} window(s) of "
                f"seq_len={self.seq_len}"
            )
        ids = np.empty((rows.size, self.seq_len + 1), np.int32)
        for i, row in enumerate(rows):
            start = row_rng(seed, split, group, row, salt=2).integers(0, stream.size - span)
            start += window * self.seq_len
            ids[i] = stream[start : start + self.seq_len + 1]
        mask = np.ones((rows.size, self.seq_len), np.float32)
        return Batch(ids[:, :-1], ids[:, 1:], mask)


# --------------------------------------------------------------------------- token shards


@dataclasses.dataclass(frozen=True)
class TokenShardLM:
    """Next-token prediction on a directory of token shards (``spectral-jax prepare-data``
    output, or a flash-stu-2 ``.npy`` directory).

    Each row is a window of ``seq_len + 1`` tokens of the split's token stream (all its shards
    end to end) at an offset drawn from the row's generator, read through a memory map (or by
    byte ranges for ``gs://`` paths). The eval split reads the ``val`` shards.

    ``tokenizer``: a ``tokenizer.json`` path; ``None`` uses the one saved with the shards
    (needed for a flash-stu-2 directory, which has none). Given both, they must be the same.
    ``document_mask``: no loss where the input is end-of-text, i.e. on predicting the first
    token of a document from the one before it.
    """

    path: str
    tokenizer: str | None = None
    seq_len: int = 256
    document_mask: bool = False

    kind = "tokens"

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"TokenShardLM.path must be a shard directory, got {self.path!r}")
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            raise ValueError(
                f"TokenShardLM.tokenizer must be a tokenizer.json path or None, "
                f"got {self.tokenizer!r}"
            )
        positive_int("TokenShardLM", "seq_len", self.seq_len)
        if not isinstance(self.document_mask, bool):
            raise ValueError(
                f"TokenShardLM.document_mask must be true or false, got {self.document_mask!r}"
            )

    def shards(self) -> ShardDirectory:
        return open_shards(self.path)

    def text_tokenizer(self) -> Tokenizer:
        return _shard_tokenizer(self.path, self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.text_tokenizer().vocab_size

    def eval_metrics(self, mean_loss: float) -> dict[str, float]:
        """Bits per token, and bits per byte of text when the manifest counts the val bytes."""
        bits = mean_loss / math.log(2)
        manifest = self.shards().manifest
        if manifest is None:
            return {"bits_per_token": bits}
        return {"bits_per_token": bits, "bits_per_byte": bits / _val_bytes_per_token(manifest)}

    def batch(self, seed: int, step: int, rows, split: Split = "train") -> Batch:
        return self.stream_window(seed, step, 0, 1, rows, split)

    def stream_window(
        self, seed: int, group: int, window: int, windows: int, rows, split: Split = "train"
    ) -> Batch:
        """Window ``window`` of ``windows`` consecutive ones, as
        :meth:`ByteCorpusLM.stream_window`: each row reads ``windows * seq_len + 1`` tokens at
        an offset drawn from the row's generator of step ``group``."""
        rows = rows_array(rows)
        stream = self.shards().splits["train" if split == "train" else "val"]
        span = _check_window("TokenShardLM", self.seq_len, window, windows)
        if stream.tokens < span + 1:
            need = "seq_len + 1" if windows == 1 else f"{windows} * seq_len + 1"
            raise ValueError(
                f"the {split} split of {self.path} holds {stream.tokens} tokens, fewer than "
                f"{need} = {span + 1}: lower task.seq_len or add documents"
            )
        vocab = self.vocab_size
        ids = np.empty((rows.size, self.seq_len + 1), np.int32)
        for i, row in enumerate(rows):
            rng = row_rng(seed, split, group, row, salt=4)
            start = int(rng.integers(0, stream.tokens - span)) + window * self.seq_len
            ids[i] = stream.read(start, self.seq_len + 1, vocab)
        inputs = ids[:, :-1]
        mask = np.ones(inputs.shape, np.float32)
        if self.document_mask:
            mask[inputs == self.text_tokenizer().eot_id] = 0.0
        return Batch(inputs, ids[:, 1:], mask)


def _check_window(name: str, seq_len: int, window: int, windows: int) -> int:
    """Validate ``0 <= window < windows``; returns the span ``windows * seq_len``."""
    positive_int(f"{name}.stream_window", "windows", windows)
    int_in_range(f"{name}.stream_window", "window", window, 0, windows - 1)
    return windows * seq_len


def _val_bytes_per_token(manifest: dict) -> float:
    return manifest["splits"]["val"]["bytes"] / manifest["splits"]["val"]["tokens"]


@functools.lru_cache(maxsize=8)
def _shard_tokenizer(path: str, tokenizer_path: str | None) -> Tokenizer:
    shards = open_shards(path)
    saved = shards.tokenizer_fingerprint
    if tokenizer_path is None:
        if saved is None:
            raise ValueError(
                f"{path} has no manifest or tokenizer (a flash-stu-2 directory?): "
                "give task.tokenizer=PATH/tokenizer.json"
            )
        return load_tokenizer(path)
    tok = load_tokenizer(tokenizer_path)
    if saved is not None and fingerprint(tok) != saved:
        raise ValueError(
            f"tokenizer mismatch: {tokenizer_path} (fingerprint {fingerprint(tok)[:12]}) is not "
            f"the tokenizer the shards in {path} were written with ({saved[:12]}); drop "
            "task.tokenizer or give that tokenizer"
        )
    return tok


def save_task_tokenizer(task, directory: str) -> None:
    """Save ``task``'s tokenizer (if it has one) as ``directory/tokenizer.json``, so that
    checkpoints carry it; a different tokenizer already there is a ``ValueError``."""
    tok = task.text_tokenizer()
    if tok is not None:
        save_tokenizer(tok, directory)
