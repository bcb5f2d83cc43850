"""Data pipeline throughput next to the training step it feeds, in one run.

Rows (every figure from this process, on this machine's CPU):

* ``prepare-data`` throughput in MB/s of UTF-8 text, for the byte tokenizer and for a 4096-id
  byte-level BPE (trained first, on the same text; training time not counted), on the standard
  library's sources (a tenth of them with ``--quick``);
* loader throughput of ``TokenShardLM``: tokens/s of windows of L=8192 (+1) at batch 32, drawn
  from the BPE shards through the memory map, on one thread (so: per host core);
* the training step's tokens/s for the ``lm_tokens_small`` preset on the same shards, measured by
  :func:`spectral_jax.train.train` after its compiling step;
* the ratio loader / train step: how many times faster the loader draws tokens than the step
  consumes them.

Usage: python experiments/bench_data.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.data import sources
from spectral_jax.data.lm_tasks import TokenShardLM
from spectral_jax.data.prepare import documents, prepare_data
from spectral_jax.data.tokenizer import save_tokenizer, train_bpe
from spectral_jax.train import train
from spectral_jax.train.presets import apply_overrides, lm_tokens_small


def text_megabytes(files) -> float:
    return sum(len(d.encode("utf-8")) for d in documents(files, "text")) / 1e6


def prepare_rate(files, out: Path, tokenizer: str) -> float:
    """MB/s of text through prepare-data (reading, tokenizing, splitting, writing)."""
    start = time.perf_counter()
    prepare_data([str(f) for f in files], str(out), tokenizer, val_percent=5.0)
    return text_megabytes(files) / (time.perf_counter() - start)


def loader_rate(path: Path, seq_len: int, batch: int, batches: int) -> float:
    task = TokenShardLM(str(path), seq_len=seq_len)
    task.batch(0, 0, range(batch))  # open and map the shards
    start = time.perf_counter()
    for step in range(batches):
        task.batch(0, step + 1, range(batch))
    return batches * batch * seq_len / (time.perf_counter() - start)


def train_rate(path: Path, steps: int) -> float:
    config = apply_overrides(lm_tokens_small(), [f"task.path={path}", "eval_batches=0"])
    config = dataclasses.replace(config, steps=steps, log_every=steps - 1)
    records = [r for r in train(config).history if "tokens_per_s" in r]
    return records[0]["tokens_per_s"]  # over every step but the first (compiling) one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the corpus, fewer steps")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    files = sources.stdlib_files()
    files = files[::10] if args.quick else files
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bpe = train_bpe((d for d in documents(files, "text")), 4096)
        save_tokenizer(bpe, str(tmp / "bpe"))
        mb = text_megabytes(files)
        rows.append({"what": "corpus (stdlib sources)", "value": mb, "unit": "MB"})
        for name, spec in (("bytes", "bytes"), ("bpe-4096", str(tmp / "bpe"))):
            rate = prepare_rate(files, tmp / name, spec)
            rows.append({"what": f"prepare-data, {name} tokenizer", "value": rate, "unit": "MB/s"})
        loader = loader_rate(tmp / "bpe-4096", 8192, 32, 4 if args.quick else 16)
        rows.append(
            {"what": "loader, L=8192 batch 32, 1 thread", "value": loader, "unit": "tokens/s/core"}
        )
        step = train_rate(tmp / "bpe-4096", 8 if args.quick else 25)
        rows.append({"what": "train step, lm_tokens_small", "value": step, "unit": "tokens/s"})
        rows.append({"what": "loader / train step", "value": loader / step, "unit": "x"})
    for row in rows:
        print(f"{row['what']:<40}{row['value']:>16,.2f} {row['unit']}")
    if args.json:
        write_json_atomic(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
