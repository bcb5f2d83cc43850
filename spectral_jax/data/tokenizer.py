"""Tokenizers: one small interface, two implementations, saved next to data and checkpoints.

- ``ByteTokenizer``: ids 0..255 are the UTF-8 bytes of the text, id 256 is end-of-text
  (``vocab_size`` 257). A byte-level model of vocabulary 256 uses it too (it never sees 256).
- ``HFTokenizer``: a Hugging Face ``tokenizers.Tokenizer`` (a local ``tokenizer.json``, or a
  byte-level BPE trained here with ``train_bpe``). Special tokens are never parsed out of text,
  so ``decode(encode(text)) == text`` for a byte-level BPE.

``token_byte_lengths`` says how many bytes of text each id stands for, where the tokenizer
maps ids to whole bytes (bytes, and byte-level BPE), so that losses can be reported per byte.

Both are saved as one file, ``tokenizer.json`` in a directory (``save_tokenizer``), and loaded
back by ``load_tokenizer``; ``fingerprint`` is a sha256 that names the exact tokenizer, so data
and checkpoints written with different tokenizers are told apart. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from spectral_jax.atomic_files import write_text_atomic
from spectral_jax.validation import positive_int

TOKENIZER_FILE = "tokenizer.json"
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_BYTES_MARKER = {"spectral_jax_tokenizer": "bytes", "version": 1}


class Tokenizer(Protocol):
    """Text <-> token ids. ``eot_id`` is the end-of-text id, or ``None`` if there is none."""

    kind: str
    vocab_size: int
    eot_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_json(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids (0..255) plus end-of-text (256)."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes ``< 256`` as UTF-8 (invalid sequences become U+FFFD); end-of-text is dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps(_BYTES_MARKER, sort_keys=True)


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer``; ``eot_id`` from the first of ``EOT_CANDIDATES``
    in its vocabulary."""

    kind = "hf"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # text never turns into special tokens
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(t) for t in EOT_CANDIDATES]
        self.eot_id = next((i for i in ids if i is not None), None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of one text."""
    return tokenizer.encode_batch([text])[0]


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray | None:
    """``[vocab_size]`` int64: the number of UTF-8 bytes of text each id stands for (0 for
    end-of-text and other special tokens), or ``None`` when ids are not whole bytes.

    Known for ``ByteTokenizer`` (one byte per id) and for Hugging Face tokenizers whose decoder
    is byte-level (GPT-2 style BPE, ``train_bpe``): there each character of a token's string
    stands for one byte. For any text these tokenizers encode, the lengths of its ids add up
    to its UTF-8 length.
    """
    if isinstance(tokenizer, ByteTokenizer):
        lengths = np.ones(tokenizer.vocab_size, np.int64)
        lengths[tokenizer.eot_id] = 0
        return lengths
    if not isinstance(tokenizer, HFTokenizer):
        return None
    from tokenizers import decoders

    raw = tokenizer._tok
    if not isinstance(raw.decoder, decoders.ByteLevel):
        return None
    lengths = np.zeros(tokenizer.vocab_size, np.int64)
    for token, index in raw.get_vocab(with_added_tokens=False).items():
        lengths[index] = len(token)
    for index, added in raw.get_added_tokens_decoder().items():  # text as written, not bytes
        lengths[index] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's serialization: equal iff the tokenizers are the same."""
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


def describe(tokenizer: Tokenizer) -> dict:
    """What manifests and run records store about a tokenizer."""
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "fingerprint": fingerprint(tokenizer),
    }


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` is id 0) trained on ``texts``,
    offline. Every text round-trips (the 256 byte symbols are always in the vocabulary)."""
    positive_int("train_bpe", "vocab_size", vocab_size, minimum=257 + 1)
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def tokenizer_from_json(text: str, source: str) -> Tokenizer:
    """Parse what ``to_json`` wrote (``source`` names it in errors)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not a tokenizer file (invalid JSON: {err})") from None
    if data == _BYTES_MARKER:
        return ByteTokenizer()
    from tokenizers import Tokenizer as RawTokenizer

    try:
        return HFTokenizer(RawTokenizer.from_str(text))
    except Exception as err:  # the Rust side raises its own exception type
        raise ValueError(f"{source} is not a Hugging Face tokenizer.json: {err}") from None


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from ``path``: a ``tokenizer.json`` file, a directory holding one, or
    ``"bytes"``. Local paths or URLs (``gs://``, through fsspec)."""
    if path == "bytes":
        return ByteTokenizer()
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        file = root if not fs.isdir(root) else f"{root.rstrip('/')}/{TOKENIZER_FILE}"
        if not fs.exists(file):
            raise ValueError(f"tokenizer file {path} does not exist")
        return tokenizer_from_json(fs.cat_file(file).decode("utf-8"), path)
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(f"tokenizer file {file} does not exist")
    return tokenizer_from_json(file.read_text(encoding="utf-8"), str(file))


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> None:
    """Write ``directory/tokenizer.json`` (atomically); local path or URL.

    An existing file is kept if it holds the same tokenizer; a different one is an error
    (nothing is overwritten).
    """
    text = tokenizer.to_json()
    if "://" in directory:
        import fsspec

        fs, root = fsspec.core.url_to_fs(directory)
        file = f"{root.rstrip('/')}/{TOKENIZER_FILE}"
        if fs.exists(file):
            _check_same(tokenizer, tokenizer_from_json(fs.cat_file(file).decode(), file), file)
            return
        fs.pipe_file(file, text.encode("utf-8"))  # one object write: atomic on GCS
        return
    file = pathlib.Path(directory) / TOKENIZER_FILE
    if file.exists():
        _check_same(tokenizer, load_tokenizer(str(file)), str(file))
        return
    write_text_atomic(file, text)


def _check_same(tokenizer: Tokenizer, existing: Tokenizer, where: str) -> None:
    if fingerprint(existing) != fingerprint(tokenizer):
        raise ValueError(
            f"{where} already holds a different tokenizer (fingerprint "
            f"{fingerprint(existing)[:12]}, this run's is {fingerprint(tokenizer)[:12]}); "
            "use another directory"
        )


class StreamDecoder:
    """Text of a growing id sequence, piece by piece: ``push(ids)`` returns the new text.

    Text that may still change (a trailing U+FFFD of an unfinished multi-byte character) is
    held back until more ids arrive or ``finish`` is called.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        return self._emit(text[:stable])

    def finish(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        new = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return new
