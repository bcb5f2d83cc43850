"""``prepare_data``: text documents -> token shards + manifest, deterministic and resumable.

Documents are read in input order (see :mod:`~spectral_jax.data.sources`); empty ones are
skipped. A document goes to ``val`` when the hash of its text says so
(``blake2b(text) mod 10^6 < val_percent * 10^4``), so the split does not depend on the order or
on other documents. Every ``docs_per_shard`` consecutive documents form one *unit*: they are
tokenized in one parallel batch (``encode_batch``), each followed by the end-of-text id, and
written as ``train_UUUUU.npy`` and ``val_UUUUU.npy`` (a split with no document in the unit
gets no file), then the unit's counts as ``parts/UUUUU.json``. Every file goes through a
temporary file and a rename, and ``manifest.json`` is written last, so readers never see a
half-written shard and an interrupted run, run again with the same arguments, skips the units
it finished and writes byte-identical shards for the rest.

``tokenizer``: ``"bytes"``, a path to a ``tokenizer.json`` (or a directory holding one), or
``"bpe:VOCAB"`` (a byte-level BPE trained here, offline, on the training split). The tokenizer
is saved as ``tokenizer.json`` in the output directory before any shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from spectral_jax.atomic_files import write_bytes_atomic
from spectral_jax.data import shards as shards_lib
from spectral_jax.data import sources
from spectral_jax.data.tokenizer import (
    Tokenizer,
    describe,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from spectral_jax.validation import one_of, positive_int

SHARD_DTYPES = ("auto", "uint16", "uint32")
_DTYPE_LIMITS = {"uint16": 2**16, "uint32": 2**32}


def in_val_split(text: str, val_percent: float) -> bool:
    """Whether a document goes to the validation split (a pure function of its text)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1_000_000 < round(val_percent * 10_000)


def shard_dtype(vocab_size: int, requested: str = "auto") -> str:
    """``uint16`` when the vocabulary fits in it, else ``uint32``; a requested dtype too small
    for the vocabulary is a ``ValueError``."""
    one_of("prepare_data", "dtype", requested, SHARD_DTYPES)
    dtype = requested if requested != "auto" else ("uint16" if vocab_size <= 2**16 else "uint32")
    if vocab_size > _DTYPE_LIMITS[dtype]:
        raise ValueError(
            f"a vocabulary of {vocab_size} ids does not fit in {dtype} shards "
            f"(at most {_DTYPE_LIMITS[dtype]}); use --dtype uint32 or auto"
        )
    return dtype


def documents(files: Sequence[pathlib.Path], text_field: str) -> Iterator[str]:
    """The non-empty documents of ``files``, in order."""
    for file in files:
        yield from (d for d in sources.read_documents(file, text_field) if d)


def check_splits(docs: Iterator[str], val_percent: float, inputs: list[str]) -> None:
    """``ValueError`` unless ``docs`` (read to the end, so that an unreadable document fails
    here) put at least one document in each split."""
    counts = {"train": 0, "val": 0}
    for doc in docs:
        counts["val" if in_val_split(doc, val_percent) else "train"] += 1
    if not any(counts.values()):
        raise ValueError(f"the inputs {inputs} hold no non-empty document: empty corpus")
    for split, count in counts.items():
        if not count:
            raise ValueError(
                f"the {split} split is empty ({counts['train']} train, {counts['val']} val "
                "documents): change --val-percent or add documents"
            )


def _units(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    unit: list[str] = []
    for doc in docs:
        unit.append(doc)
        if len(unit) == size:
            yield unit
            unit = []
    if unit:
        yield unit


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_unit(
    out: pathlib.Path, index: int, unit: list[str], tokenizer: Tokenizer, dtype: str, val: float
) -> dict:
    """Tokenize one unit and write its shards, then its counts (``parts/UUUUU.json``)."""
    counts = {}
    for split in shards_lib.SPLITS:
        docs = [d for d in unit if in_val_split(d, val) == (split == "val")]
        ids = tokenizer.encode_batch(docs) if docs else []
        pieces = [np.append(np.asarray(d, np.int64), tokenizer.eot_id) for d in ids]
        tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
        name = f"{split}_{index:05d}.npy"
        if tokens.size:
            write_bytes_atomic(out / name, _npy_bytes(tokens))
        counts[split] = {
            "file": name,
            "tokens": int(tokens.size),
            "documents": len(docs),
            "bytes": sum(len(d.encode("utf-8")) for d in docs),
        }
    write_bytes_atomic(out / "parts" / f"{index:05d}.json", json.dumps(counts).encode())
    return counts


def _plan(inputs, files, tokenizer, text_field, val_percent, docs_per_shard, dtype) -> dict:
    return {
        "inputs": list(inputs),
        "files": [[str(f), f.stat().st_size] for f in files],
        "tokenizer": tokenizer,
        "text_field": text_field,
        "val_percent": val_percent,
        "docs_per_shard": docs_per_shard,
        "dtype": dtype,
    }


def _start(out: pathlib.Path, plan: dict) -> dict | None:
    """Claim ``out`` for ``plan``; the manifest if this run already finished there."""
    plan_file = out / shards_lib.PLAN
    if plan_file.exists():
        if json.loads(plan_file.read_text()) != plan:
            raise ValueError(
                f"{out} holds a prepare-data run with other inputs or settings; nothing is "
                "overwritten: choose another --out (or delete it)"
            )
        for stale in [*out.glob(".*.tmp"), *out.glob("parts/.*.tmp")]:
            stale.unlink()  # temporary files of writes cut short
        return shards_lib.read_manifest(str(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists and is not an empty directory or a prepare-data run; nothing is "
            "overwritten: choose another --out"
        )
    write_bytes_atomic(plan_file, json.dumps(plan, indent=1).encode())
    return None


def _bpe_vocab(spec: str) -> int | None:
    """``VOCAB`` of ``"bpe:VOCAB"``; ``None`` for another spec."""
    if not spec.startswith("bpe:"):
        return None
    try:
        vocab = int(spec[4:])
    except ValueError:
        raise ValueError(f"--tokenizer {spec!r}: expected bpe:VOCAB, e.g. bpe:4096") from None
    return positive_int("prepare_data", "bpe vocabulary", vocab, minimum=258)


def _check_eot(tok: Tokenizer, spec: str) -> Tokenizer:
    if tok.eot_id is None:
        raise ValueError(
            f"tokenizer {spec!r} has no end-of-text token (one of <|endoftext|>, </s>, ...): "
            "prepare-data puts one between documents"
        )
    return tok


class _Progress:
    """A progress line on stderr: units, megabytes of text, MB/s, tokens."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled, self.start = total_bytes, enabled, time.perf_counter()
        self.bytes = self.tokens = 0

    def update(self, unit: int, counts: dict, skipped: bool) -> None:
        self.bytes += sum(c["bytes"] for c in counts.values())
        self.tokens += sum(c["tokens"] for c in counts.values())
        if not self.enabled:
            return
        rate = self.bytes / 1e6 / max(time.perf_counter() - self.start, 1e-9)
        percent = 100.0 * min(self.bytes / max(self.total, 1), 1.0)
        print(
            f"\rprepare-data: shard {unit} {'(done before) ' if skipped else ''}| "
            f"{self.bytes / 1e6:,.1f} MB ~{percent:.0f}% | {rate:.2f} MB/s | "
            f"{self.tokens:,} tokens",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def prepare_data(
    inputs: Sequence[str],
    out: str,
    tokenizer: str = "bytes",
    *,
    text_field: str = "text",
    val_percent: float = 1.0,
    docs_per_shard: int = 4096,
    dtype: str = "auto",
    stdlib: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenize ``inputs`` (plus the standard library's sources if ``stdlib``) into shards in
    ``out``; returns the manifest (see the module docstring and :mod:`.shards`)."""
    positive_int("prepare_data", "docs_per_shard", docs_per_shard)
    one_of("prepare_data", "dtype", dtype, SHARD_DTYPES)
    if not 0.0 < float(val_percent) <= 50.0:
        raise ValueError(f"prepare_data.val_percent must be in (0, 50], got {val_percent!r}")
    if not inputs and not stdlib:
        raise ValueError("prepare_data needs at least one input (a file, directory or glob)")
    files = sources.expand_inputs(inputs) + (sources.stdlib_files() if stdlib else [])
    # Every check that can fail on the arguments or the inputs runs before anything is
    # written: one pass reads (decodes) every document and counts the splits.
    check_splits(documents(files, text_field), val_percent, list(inputs))
    bpe_vocab = _bpe_vocab(tokenizer)
    tok = None if bpe_vocab else _check_eot(load_tokenizer(tokenizer), tokenizer)
    shard_type = shard_dtype(bpe_vocab or tok.vocab_size, dtype)
    out_path = pathlib.Path(out)
    plan = _plan(inputs, files, tokenizer, text_field, val_percent, docs_per_shard, dtype)
    if stdlib:
        plan["stdlib"] = True
    done = _start(out_path, plan)
    if done is not None:
        return done

    def train_docs():
        return (d for d in documents(files, text_field) if not in_val_split(d, val_percent))

    if tok is None:  # bpe: the tokenizer of an interrupted run, or a new one
        saved = out_path / "tokenizer.json"
        tok = load_tokenizer(str(saved)) if saved.exists() else train_bpe(train_docs(), bpe_vocab)
    save_tokenizer(tok, str(out_path))

    totals = {s: {"tokens": 0, "documents": 0, "bytes": 0, "shards": []} for s in shards_lib.SPLITS}
    bar = _Progress(sum(f.stat().st_size for f in files), progress)
    for index, unit in enumerate(_units(documents(files, text_field), docs_per_shard)):
        part = out_path / "parts" / f"{index:05d}.json"
        skipped = part.exists()
        if skipped:
            counts = json.loads(part.read_text())
            for c in counts.values():
                shards_lib.check_shard_name(str(part), c["file"])
        else:
            counts = write_unit(out_path, index, unit, tok, shard_type, val_percent)
        bar.update(index, counts, skipped)
        for split, c in counts.items():
            for key in ("tokens", "documents", "bytes"):
                totals[split][key] += c[key]
            if c["tokens"]:
                totals[split]["shards"].append({"file": c["file"], "tokens": c["tokens"]})
    bar.close()
    for t in totals.values():
        t["bytes_per_token"] = t["bytes"] / t["tokens"]
    manifest = {
        "format": shards_lib.FORMAT,
        "version": shards_lib.VERSION,
        "dtype": shard_type,
        "tokenizer": describe(tok),
        "val_percent": val_percent,
        "splits": totals,
    }
    write_bytes_atomic(out_path / shards_lib.MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
