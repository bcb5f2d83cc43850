"""The documents of local inputs, in a fixed order.

An input is a file, a directory (searched recursively for ``.txt``, ``.jsonl`` and ``.parquet``
files) or a glob (``**`` recurses). Files are read by suffix:

- ``.jsonl``: one JSON object per line; its ``text_field`` is one document;
- ``.parquet``: the ``text_field`` column, one document per row (needs the ``parquet`` extra,
  ``pip install spectral_jax[parquet]``);
- anything else: the whole file is one UTF-8 document.

The standard-library corpus (``stdlib_files``) is the running Python's ``.py`` sources without
tests and installed packages, the files ``ByteCorpusLM`` trains on.
"""

from __future__ import annotations

import glob
import json
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_root() -> pathlib.Path:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    return root


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard-library ``.py`` files, sorted by path relative to ``root``."""
    root = stdlib_root() if root is None else root
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [root / r for r in rel]


def expand_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
    """The files named by ``inputs``, in input order (each input's files sorted); an input
    that names nothing is a ``ValueError``."""
    files: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item)
        if any(c in item for c in "*?["):
            found = sorted(pathlib.Path(p) for p in glob.glob(item, recursive=True))
            found = [p for p in found if p.is_file()]
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in DIRECTORY_SUFFIXES
            )
        elif path.is_file():
            found = [path]
        else:
            raise ValueError(f"input {item!r} does not exist")
        if not found:
            raise ValueError(f"input {item!r} holds no files to read")
        files.extend(found)
    return files


def read_documents(file: pathlib.Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file (see the module docstring)."""
    if file.suffix == ".jsonl":
        yield from _jsonl_documents(file, text_field)
    elif file.suffix == ".parquet":
        yield from _parquet_documents(file, text_field)
    else:
        try:
            yield file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file} is not UTF-8 text: {err}") from None


def _jsonl_documents(file: pathlib.Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{file}:{number}: expected a JSON object with a string field "
                    f"{text_field!r} (--text-field), got {type(err).__name__}: {err}"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{number}: field {text_field!r} is not a string")
            yield text


def _parquet_documents(file: pathlib.Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"reading {file} needs pyarrow: pip install 'spectral_jax[parquet]'"
        ) from None
    parquet = pq.ParquetFile(file)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{file} has no column {text_field!r} (--text-field); it has "
            f"{parquet.schema_arrow.names}"
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)
