"""Streaming evaluation: chunked losses with carried state equal the parallel forward's; STU
models refuse streams longer than max_len; a distilled model reads past it; position buckets,
stream offsets, document joining and byte counts; ``spectral-jax evaluate`` end to end."""

import dataclasses
import json
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LM
from flax import nnx

from spectral_jax.apps.cli import main
from spectral_jax.data.tokenizer import ByteTokenizer, encode, token_byte_lengths, train_bpe
from spectral_jax.decode import evaluate as ev
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.train import CheckpointConfig, load_for_inference, train
from spectral_jax.train.presets import apply_overrides, lm_bytes_small
from spectral_jax.train.step import per_position_loss

CONFIG = ModelConfig(
    d_model=16, num_layers=2, max_len=16, vocab_size=11, layer_pattern="SA", num_filters=4,
    stu_projection="tensordot", num_heads=2, window=4,
)  # fmt: skip
# float32: the step path and the FFT path differ by ~1e-6 of O(1) logits (test_generate's
# TOL32 = 1e-5 bounds the logits); cross-entropy is 1-Lipschitz in the logits.
TOL32 = 1e-5


def test_chunked_stream_losses_equal_the_forward_pass():
    model = SpectralModel(CONFIG, rngs=nnx.Rngs(0))
    streams = np.random.default_rng(0).integers(0, 11, (2, 17)).astype(np.int32)
    calls = []
    losses = ev.stream_losses(model, streams, chunk=5, progress=lambda *a: calls.append(a))
    assert losses.shape == (2, 16)  # chunks 5, 5, 5 and 1 padded to 5: state carried
    assert calls == [(0, 16), (5, 16), (10, 16), (15, 16), (16, 16)]
    logits = model(jnp.asarray(streams[:, :-1]))
    want = np.asarray(per_position_loss(logits, jnp.asarray(streams[:, 1:]), "tokens"))
    np.testing.assert_allclose(losses, want, atol=TOL32, rtol=TOL32)
    with pytest.raises(ValueError, match=r"a stream of 20 positions needs 20 positions"):
        ev.stream_losses(model, np.zeros((1, 21), np.int32))


def test_an_attention_only_model_reads_past_max_len():
    model = SpectralModel(dataclasses.replace(CONFIG, attention_only=True), rngs=nnx.Rngs(1))
    streams = np.random.default_rng(1).integers(0, 11, (1, 49)).astype(np.int32)
    losses = ev.stream_losses(model, streams, chunk=16)  # 3 x max_len
    logits = model(jnp.asarray(streams[:, :-1]))  # the parallel path has no limit either
    want = np.asarray(per_position_loss(logits, jnp.asarray(streams[:, 1:]), "tokens"))
    np.testing.assert_allclose(losses, want, atol=TOL32, rtol=TOL32)


def test_position_buckets_double_past_the_training_length_and_cut_at_n():
    spans = [(b.start, b.stop, b.label, b.cut) for b in ev.position_buckets(256, 1000)]
    assert spans == [
        (0, 128, "[0, L/2)", False),
        (128, 256, "[L/2, L)", False),
        (256, 512, "[L, 2L)", False),
        (512, 1000, "[2L, 3.91L) (cut at N)", True),
    ]
    assert [b.stop for b in ev.position_buckets(256, 4096)] == [128, 256, 512, 1024, 2048, 4096]
    assert [b.stop for b in ev.position_buckets(256, 128)] == [128]
    with pytest.raises(ValueError, match=r"shorter than the first position bucket \[0, 128\)"):
        ev.position_buckets(256, 127)


def test_stream_offsets_are_disjoint_evenly_spaced_and_seeded():
    sets = [ev.evenly_spaced_offsets(1000, 3, 99, seed) for seed in range(3)]
    for offsets in sets:
        assert np.all(np.diff(offsets) == 1000 // 3)  # evenly spaced, 333 >= 100: disjoint
        assert 0 <= offsets[0] and offsets[-1] + 100 <= 1000
    assert len({tuple(o) for o in sets}) == 3
    tokens = np.arange(1000)
    np.testing.assert_array_equal(ev.cut_streams(tokens, sets[0], 99)[:, 0], sets[0])
    with pytest.raises(ValueError, match=r"too few for 11 disjoint streams of 99 \+ 1 tokens"):
        ev.evenly_spaced_offsets(1000, 11, 99)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        ev.evenly_spaced_offsets(1000, 3, 99, -1)


def test_documents_are_joined_as_training_data_joins_them():
    docs = ["ab", "", "c"]  # an empty document is skipped by the readers, not here
    tokens, joined = ev.text_tokens(iter(docs), ByteTokenizer(), 257)
    assert tokens.tolist() == [97, 98, 256, 256, 99, 256] and joined == "end-of-text id 256"
    tokens, joined = ev.text_tokens(iter(docs), ByteTokenizer(), 256)  # ByteCorpusLM's files
    assert tokens.tolist() == [97, 98, 99] and joined == "nothing"
    with pytest.raises(ValueError, match=r"document 1 .* holds text no tokenizer can encode"):
        ev.text_tokens(iter(["ok", "x\ud800"]), ByteTokenizer(), 256)
    with pytest.raises(ValueError, match=r"encodes to id 122, outside the model's vocabulary 100"):
        ev.text_tokens(iter(["z"]), ByteTokenizer(), 100)
    with pytest.raises(ValueError, match="no non-empty document"):
        ev.text_tokens(iter([]), ByteTokenizer(), 256)


def test_bits_per_byte_divides_by_the_bytes_of_the_predicted_tokens():
    bpe = train_bpe(["def f(x): return x # café 日本\n" * 20], 300)
    text = "def g(y): return café 日本 ünï"
    ids = encode(bpe, text)
    lengths = token_byte_lengths(bpe)
    assert lengths[ids].sum() == len(text.encode("utf-8")) and lengths[bpe.eot_id] == 0
    assert token_byte_lengths(ByteTokenizer())[[0, 255, 256]].tolist() == [1, 1, 0]
    losses = np.random.default_rng(2).uniform(0, 3, (2, 6))
    nbytes = np.array([[1, 2, 0, 3, 1, 1], [2, 2, 1, 1, 0, 4]])
    rows = ev.bucket_summary(losses, nbytes, ev.position_buckets(4, 6))
    assert [(r["start"], r["stop"], r["tokens"]) for r in rows] == [(0, 2, 4), (2, 4, 4), (4, 6, 4)]
    for r in rows:
        part = losses[:, r["start"] : r["stop"]]
        assert r["bits_per_token"] == pytest.approx(part.mean() / math.log(2), rel=1e-12)
        bits_per_byte = part.sum() / math.log(2) / nbytes[:, r["start"] : r["stop"]].sum()
        assert r["bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-12)
    assert ev.bucket_summary(losses, None, ev.position_buckets(4, 6))[0]["bits_per_byte"] is None


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A 2-step TINY_LM ``lm_bytes_small`` (vocabulary 256, L = max_len = 64), and a directory
    of two text files."""
    root = tmp_path_factory.mktemp("evaluate")
    config = apply_overrides(lm_bytes_small(), TINY_LM)
    checkpoint = CheckpointConfig(str(root / "ckpt"), async_save=False)
    train(dataclasses.replace(config, checkpoint=checkpoint))
    texts = root / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20, encoding="utf-8")
    (texts / "b.txt").write_text("class C:\n    pass  # é\n" * 20, encoding="utf-8")
    return root


def test_evaluate_buckets_equal_the_mean_of_stream_losses(byte_checkpoint, tmp_path, capsys):
    ckpt, texts, out = byte_checkpoint / "ckpt", byte_checkpoint / "texts", tmp_path / "r.json"
    args = ["evaluate", str(ckpt), str(texts), "--stream-len", "150", "--streams", "3"]
    assert main([*args, "--strategy", "lds", "--num-states", "40", "--chunk", "50",
                 "--offsets-seed", "1", "--json", str(out)]) == 0  # fmt: skip
    assert "[2L, 2.34L) (cut at N)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["train_len"] == 64 and report["stream_len"] == 150 and report["streams"] == 3
    assert report["model"]["kind"] == "distilled" and report["model"]["length_limit"] is None
    assert report["documents_joined_with"] == "nothing"  # vocabulary 256: files end to end
    assert report["bits_per_byte_known"] and report["us_per_token"] > 0
    assert len(report["state_floats_per_sequence"]) == 2
    # Independently: the files' bytes end to end, the report's offsets, one chunk of 150.
    text = np.frombuffer((texts / "a.txt").read_bytes() + (texts / "b.txt").read_bytes(), np.uint8)
    assert report["text_tokens"] == text.size
    offsets = np.asarray(report["offsets"])
    assert np.all(np.diff(offsets) == text.size // 3)
    streams = np.stack([text[o : o + 151] for o in offsets]).astype(np.int32)
    model, _ = load_for_inference(str(ckpt))
    losses = ev.stream_losses(decode_plan(model, "lds", num_states=40).model, streams, chunk=150)
    spans = [(b["start"], b["stop"], b["tokens"]) for b in report["buckets"]]
    assert spans == [(0, 32, 96), (32, 64, 96), (64, 128, 192), (128, 150, 66)]
    for bucket in report["buckets"]:
        want = losses[:, bucket["start"] : bucket["stop"]].mean() / math.log(2)
        # Each loss agrees to TOL32 (abs + rel) across chunkings, and so does their mean.
        assert bucket["bits_per_token"] == pytest.approx(want, rel=TOL32, abs=TOL32)
        assert bucket["bits_per_byte"] == bucket["bits_per_token"]  # one byte per token


def test_evaluate_bad_text_is_one_line_and_writes_nothing(byte_checkpoint, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "ab\\ud800"}\n')
    ckpt, out = str(byte_checkpoint / "ckpt"), tmp_path / "r.json"
    cases = {
        "empty.txt": "no non-empty document",
        "surrogate.jsonl": "holds text no tokenizer can encode",
    }
    for name, phrase in cases.items():
        args = ["evaluate", ckpt, str(tmp_path / name), "--stream-len", "32", "--json", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and phrase in err[0], err
    assert not out.exists()


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    args = ["evaluate", str(tmp_path), str(tmp_path), "--stream-len", "8"]
    assert main([*args, "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib: pip install 'spectral_jax[plots]'" in capsys.readouterr().err
