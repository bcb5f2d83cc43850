"""`spectral-jax generate` (streaming, three strategies) and chunked decoding."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LM

from spectral_jax.apps.cli import main
from spectral_jax.decode.generate import decode, decode_chunks, generate, prefill
from spectral_jax.train import CheckpointConfig, load_for_inference, train
from spectral_jax.train.presets import apply_overrides, lm_bytes_small, lm_tokens_small


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("lm") / "ckpt")
    config = apply_overrides(lm_bytes_small(), TINY_LM)
    train(dataclasses.replace(config, checkpoint=CheckpointConfig(directory, async_save=False)))
    return directory


def test_chunked_decoding_equals_one_scan(byte_checkpoint):
    model, _ = load_for_inference(byte_checkpoint)
    prompt = jnp.asarray([list(b"def f(x):")], jnp.int32)
    logits, cache = prefill(model, prompt)
    whole = np.asarray(decode(model, cache, logits, 20))
    logits, cache = prefill(model, prompt)
    chunks = [np.asarray(t) for t in decode_chunks(model, cache, logits, 20, chunk=6)]
    assert [c.shape[1] for c in chunks] == [6, 6, 6, 2]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)


def test_generate_streams_the_same_greedy_text_with_every_strategy(byte_checkpoint, capsys):
    texts = {}
    for strategy in ("naive", "futurefill", "lds"):
        args = [
            "generate",
            byte_checkpoint,
            "--prompt",
            "import os\n",
            "--strategy",
            strategy,
            "--max-new-tokens",
            "30",
            "--chunk",
            "7",
            "--num-states",
            "40",
        ]
        assert main(args) == 0
        texts[strategy] = capsys.readouterr().out
    assert texts["naive"].startswith("import os\n")
    assert texts["naive"] == texts["futurefill"] == texts["lds"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--max-new-tokens", "100"],
            "prompt of 2 tokens + 100 new tokens needs 102 positions, but block 0 (STU) can run "
            "at most max_len=64; distill the model",
        ),
        (["--top-k", "3"], "needs temperature > 0"),
    ],
)
def test_generate_bad_input_is_one_clear_line(byte_checkpoint, capsys, extra, match):
    assert main(["generate", byte_checkpoint, "--prompt", "ab", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_generate_from_a_distilled_checkpoint_runs_past_max_len(byte_checkpoint, tmp_path):
    """The distilled model has no length limit: 4 x max_len new bytes, from the command line."""
    distilled = str(tmp_path / "distilled")
    assert main(["distill", byte_checkpoint, distilled, "--num-states", "40"]) == 0
    new = 4 * 64  # the checkpoint's max_len is 64
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "spectral_jax.apps.cli", "generate", distilled, "--prompt", "def ",
         "--strategy", "lds", "--max-new-tokens", str(new), "--chunk", "64"],
        capture_output=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    model, _ = load_for_inference(distilled)
    tokens = np.asarray(generate(model, [list(b"def ")], new))[0]  # greedy, like the CLI default
    expected = "def " + bytes(tokens.tolist()).decode("utf-8", errors="replace") + "\n"
    assert done.stdout.decode("utf-8") == expected


def test_demo_runs_end_to_end(capsys):
    assert main(["demo", "--steps", "3", "--new-tokens", "8", "--num-states", "40"]) == 0
    out = capsys.readouterr().out
    for heading in ("== 1. training", "== 2. distilling", "== 3. sampling"):
        assert heading in out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["naive"], ["futurefill"], ["lds"])
    ]
    assert [r[0] for r in rows] == ["naive", "futurefill", "lds"]
    assert all(r[-1] == "8/8" for r in rows), rows  # every strategy samples the same bytes


def test_prepare_train_distill_generate_through_a_bpe_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["def", "return", "import", "os", "self", "(x):", "\n", "    ", "é"]
    lines = [json.dumps({"body": " ".join(rng.choice(words, 40))}) for _ in range(60)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shards = tmp_path / "shards"
    prep = ["prepare-data", str(corpus), "--out", str(shards), "--tokenizer", "bpe:300"]
    assert main([*prep, "--text-field", "body", "--val-percent", "20"]) == 0
    assert "val:" in capsys.readouterr().out
    ckpt, distilled = str(tmp_path / "ckpt"), str(tmp_path / "distilled")
    overrides = [o for o in TINY_LM if not o.startswith("task.")] + [
        f"task.path={shards}",
        "task.seq_len=64",
        "model.vocab_size=300",
    ]
    config = apply_overrides(lm_tokens_small(), overrides)
    train(dataclasses.replace(config, checkpoint=CheckpointConfig(ckpt, async_save=False)))
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert main(["distill", ckpt, distilled, "--num-states", "40"]) == 0
    assert (tmp_path / "distilled" / "tokenizer.json").is_file()
    capsys.readouterr()
    texts = {}
    for directory, strategy in ((ckpt, "naive"), (distilled, "lds")):
        args = ["generate", directory, "--prompt", "def self", "--strategy", strategy]
        assert main([*args, "--max-new-tokens", "12", "--chunk", "5"]) == 0
        texts[strategy] = capsys.readouterr().out
    assert texts["naive"].startswith("def self") and len(texts["naive"]) > len("def self\n")
    assert texts["naive"] == texts["lds"]
