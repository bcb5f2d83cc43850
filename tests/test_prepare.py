"""prepare-data: round trips, splits, resume after a kill, corrupt shards, flash-stu-2 layout,
and bad input (clear errors, nothing overwritten)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from spectral_jax.data import prepare
from spectral_jax.data.lm_tasks import TokenShardLM
from spectral_jax.data.prepare import in_val_split, prepare_data, shard_dtype
from spectral_jax.data.shards import ShardDirectory, ShardError
from spectral_jax.data.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    encode,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
)
from spectral_jax.train.checkpoint import CheckpointError
from spectral_jax.train.config import check_resumable

VAL = 25.0


def _documents() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "héllo", "漢字", "🙂", "\n", "    ", "<|endoftext|>", "\t"]
    return [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    for i, doc in enumerate(docs[:10]):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    with (root / "rest.jsonl").open("w", encoding="utf-8") as f:
        for doc in docs[10:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return root, docs


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("prepared") / "bpe"
    prepare_data([str(corpus[0])], str(out), "bpe:300", val_percent=VAL, docs_per_shard=8)
    return out


def _split_documents(directory: pathlib.Path, split: str) -> list[list[int]]:
    stream = ShardDirectory(str(directory)).splits[split]
    tokens = stream.read(0, stream.tokens).tolist()
    eot = load_tokenizer(str(directory)).eot_id
    assert tokens[-1] == eot
    docs, current = [], []
    for t in tokens:
        if t == eot:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


@pytest.mark.parametrize("spec", ["bytes", "bpe:300"])
def test_round_trip_and_every_document_in_exactly_one_split(corpus, tmp_path, spec):
    root, docs = corpus
    out = tmp_path / "out"
    manifest = prepare_data([str(root)], str(out), spec, val_percent=VAL, docs_per_shard=8)
    tok = load_tokenizer(str(out))
    assert manifest["tokenizer"]["fingerprint"] == fingerprint(tok)
    assert manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        expected = [d for d in docs if in_val_split(d, VAL) == (split == "val")]
        assert expected  # both splits hold documents
        decoded = [tok.decode(ids) for ids in _split_documents(out, split)]
        assert decoded == expected  # decode(encode(text)) == text, in input order
        counts = manifest["splits"][split]
        assert counts["documents"] == len(expected)
        assert counts["bytes"] == sum(len(d.encode()) for d in expected)
        assert counts["tokens"] == ShardDirectory(str(out)).splits[split].tokens


def test_stream_decoder_holds_back_unfinished_characters():
    tok = ByteTokenizer()
    ids = encode(tok, "a漢🙂")
    stream = StreamDecoder(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "a漢🙂" and "\ufffd" not in "".join(pieces)


def test_a_killed_run_resumes_to_byte_identical_shards(corpus, prepared, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real, calls = prepare.write_unit, []

    def dies_after_two_units(*args):
        if len(calls) == 2:
            (out / ".train_00002.npy.half.tmp").write_bytes(b"half")  # a write cut short
            raise KeyboardInterrupt("killed")
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(prepare, "write_unit", dies_after_two_units)
    args = ([str(corpus[0])], str(out), "bpe:300")
    with pytest.raises(KeyboardInterrupt):
        prepare_data(*args, val_percent=VAL, docs_per_shard=8)
    with pytest.raises(ShardError, match="unfinished prepare-data run"):
        ShardDirectory(str(out))  # a reader never sees the partial output
    monkeypatch.setattr(prepare, "write_unit", real)
    prepare_data(*args, val_percent=VAL, docs_per_shard=8)
    assert not list(out.glob(".*.tmp"))
    names = sorted(p.name for p in prepared.iterdir() if p.suffix == ".npy")
    assert names == sorted(p.name for p in out.iterdir() if p.suffix == ".npy")
    for name in [*names, "tokenizer.json", "manifest.json"]:
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name


def test_truncated_or_corrupt_shard_names_the_file(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    stream = ShardDirectory(str(copy)).splits["train"]
    with pytest.raises(ShardError, match=r"train_00001\.npy"):
        stream.read(0, stream.tokens)
    shard.write_bytes(b"garbage" * 20)
    with pytest.raises(ShardError, match=r"train_00001\.npy.*truncated or not a \.npy"):
        ShardDirectory(str(copy)).splits["train"].read(0, stream.tokens)


def test_flash_stu_2_npy_layout_is_read_as_is(tmp_path):
    rng = np.random.default_rng(1)
    parts = {
        name: rng.integers(0, 257, n).astype(np.uint32)
        for name, n in [("fw_train_000.npy", 50), ("fw_train_001.npy", 70), ("fw_val_000.npy", 40)]
    }
    for name, array in parts.items():
        np.save(tmp_path / name, array)
    with pytest.raises(ValueError, match=r"give task\.tokenizer="):
        TokenShardLM(str(tmp_path), seq_len=8).text_tokenizer()
    save_tokenizer(ByteTokenizer(), str(tmp_path / "tok"))
    task = TokenShardLM(
        str(tmp_path), tokenizer=str(tmp_path / "tok" / "tokenizer.json"), seq_len=8
    )
    train = np.concatenate([parts["fw_train_000.npy"], parts["fw_train_001.npy"]])
    stream = task.shards().splits["train"]
    assert stream.tokens == 120
    np.testing.assert_array_equal(stream.read(45, 10), train[45:55])  # across two shards
    batch = task.batch(seed=0, step=0, rows=range(4), split="eval")
    val = parts["fw_val_000.npy"].astype(np.int64)
    for row_in, row_out in zip(batch.inputs, batch.targets, strict=True):
        starts = [s for s in range(40 - 8) if np.array_equal(val[s : s + 8], row_in)]
        assert starts and np.array_equal(val[starts[0] + 1 : starts[0] + 9], row_out)
    assert task.eval_metrics(np.log(2.0)) == {"bits_per_token": 1.0}  # no byte counts known
    # A URL reads the same tokens by byte ranges (fsspec; gs:// works the same way).
    url = TokenShardLM(f"file://{tmp_path}", tokenizer=f"file://{tmp_path}/tok", seq_len=8)
    by_ranges = url.shards().splits["train"]
    assert not isinstance(by_ranges.shard(0), np.memmap)
    np.testing.assert_array_equal(by_ranges.read(45, 10), train[45:55])
    for a, b in zip(url.batch(0, 0, range(4), "eval"), batch, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(corpus, prepared, tmp_path):
    root = corpus[0]
    with pytest.raises(ValueError, match="'nope' does not exist"):
        prepare_data(["nope"], str(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_data([str(tmp_path / "empty")], str(tmp_path / "b"))
    with pytest.raises(ValueError, match="does not fit in uint16"):
        shard_dtype(70_000, "uint16")
    assert shard_dtype(70_000) == "uint32" and shard_dtype(4096) == "uint16"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # An unrelated directory, or a finished run with other settings: left exactly as it was.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="nothing is overwritten"):
        prepare_data([str(root)], str(tmp_path / "mine"), val_percent=10.0)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]
    before = {p.name: p.read_bytes() for p in prepared.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="other inputs or settings"):
        prepare_data([str(root)], str(prepared), "bpe:300", val_percent=10.0, docs_per_shard=8)
    assert before == {p.name: p.read_bytes() for p in prepared.iterdir() if p.is_file()}


def test_sequence_too_long_and_tokenizer_mismatch(prepared, tmp_path):
    val_tokens = ShardDirectory(str(prepared)).splits["val"].tokens
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenShardLM(str(prepared), seq_len=val_tokens).batch(0, 0, [0], split="eval")
    save_tokenizer(ByteTokenizer(), str(tmp_path))
    other = TokenShardLM(str(prepared), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        other.text_tokenizer()
    with pytest.raises(ValueError, match="already holds a different tokenizer"):
        save_tokenizer(load_tokenizer(str(prepared)), str(tmp_path))
    record = {"task": {}, "model": {}, "seed": 0, "global_batch": 1}
    saved = {**record, "tokenizer": {"fingerprint": "a" * 64, "vocab_size": 300}}
    current = {**record, "tokenizer": {"fingerprint": "b" * 64, "vocab_size": 257}}
    with pytest.raises(CheckpointError, match="tokenizer mismatch"):
        check_resumable(saved, current, "ckpt")
