"""The bad-input table: every command x every bad input is one line on stderr that names the
problem, rc 2, no traceback, and nothing written or changed."""

import json
import shutil
import types

import pytest
from conftest import TINY_LM

from spectral_jax.apps.cli import describe_input_error, main
from spectral_jax.train.checkpoint import LOCK_FILE


def manifest_with_shard_file(shards, out, name):
    """A copy of ``shards`` whose manifest names ``name`` as its first train shard."""
    shutil.copytree(shards, out)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = name
    path.write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    text = root / "corpus.jsonl"
    docs = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 3} for i in range(100)]
    text.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "one.txt").write_text("one document\n")
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    shards, bpe = root / "shards", root / "bpe_shards"
    assert main(["prepare-data", str(text), "--out", str(shards), "--val-percent", "20"]) == 0
    prep = ["prepare-data", str(text), "--out", str(bpe), "--tokenizer", "bpe:300"]
    assert main([*prep, "--val-percent", "20"]) == 0
    ckpt = root / "ckpt"
    sets = [a for o in TINY_LM for a in ("--set", o)]
    assert main(["train", "lm_bytes_small", *sets, "--checkpoint-dir", str(ckpt)]) == 0
    outside = root / "outside.npy"
    shutil.copy(shards / "val_00000.npy", outside)
    interrupted = root / "interrupted"  # a prepare-data run stopped before its manifest
    shutil.copytree(shards, interrupted)
    (interrupted / "manifest.json").unlink()
    part = interrupted / "parts" / "00000.json"
    part.write_text(part.read_text().replace("train_00000.npy", "../outside.npy"))
    return types.SimpleNamespace(
        root=root,
        text=str(text),
        latin1=str(root / "latin1.txt"),
        bad_jsonl=str(root / "bad.jsonl"),
        shards=str(shards),
        bpe=str(bpe),
        ckpt=str(ckpt),
        missing=str(root / "missing"),
        new=str(root / "new"),
        interrupted=str(interrupted),
        up=str(manifest_with_shard_file(shards, root / "up_shards", "../outside.npy")),
        absolute=str(manifest_with_shard_file(shards, root / "abs_shards", str(outside))),
    )


def tokens_train(path, *extra):
    sets = [f"task.path={path}", "model.vocab_size=300", *TINY_LM[:2], *TINY_LM[3:], *extra]
    return ["train", "lm_tokens_small", *[a for o in sets for a in ("--set", o)]]


def distill(source, out):
    return ["distill", source, out, "--num-states", "40"]


def evaluate(checkpoint, text, f, *extra):
    """``spectral-jax evaluate`` of ``text`` (None: no input), 64-token streams by default,
    its report asked for in the fixture's directory (so that the table sees it if written)."""
    inputs = [] if text is None else [text]
    args = ["evaluate", checkpoint, *inputs, "--stream-len", "64", "--json", f"{f.new}.json"]
    return [*args, *extra]


# (command, bad input) -> argv from the fixtures, and a phrase the one error line holds.
ROWS = {
    "demo/no steps": (lambda f: ["demo", "--steps", "0"], "steps must be an integer >= 1"),
    "train/missing shards": (lambda f: tokens_train(f.missing), "does not exist"),
    "train/checkpoint as shards": (lambda f: tokens_train(f.ckpt), "neither a prepare-data"),
    "train/unknown --set key": (
        lambda f: ["train", "lds_small", "--set", "model.no_such_field=3"],
        "no_such_field",
    ),
    "train/tokenizer differs from the shards'": (
        lambda f: tokens_train(f.shards, f"task.tokenizer={f.bpe}/tokenizer.json"),
        "tokenizer mismatch",
    ),
    "train/tokenizer differs from the checkpoint's": (
        lambda f: [*tokens_train(f.bpe), "--checkpoint-dir", f.ckpt],
        "already holds a different tokenizer",
    ),
    "train/shards as checkpoint dir": (
        lambda f: ["train", "lds_small", "--set", "steps=2", "--checkpoint-dir", f.shards],
        "token shard directory",
    ),
    "train/--metrics is a directory": (
        lambda f: ["train", "lds_small", "--set", "steps=2", "--metrics", f.ckpt],
        "Is a directory: check the path",
    ),
    "train/manifest names ../x.npy": (lambda f: tokens_train(f.up), "leaves its directory"),
    "train/manifest names an absolute path": (
        lambda f: tokens_train(f.absolute),
        "leaves its directory",
    ),
    "distill/missing checkpoint": (
        lambda f: distill(f.missing, f.new),
        "does not exist: pass the directory",
    ),
    "distill/shards as checkpoint": (lambda f: distill(f.shards, f.new), "token shard directory"),
    "distill/shards as output": (lambda f: distill(f.ckpt, f.shards), "token shard directory"),
    "generate/missing checkpoint": (
        lambda f: ["generate", f.missing, "--prompt", "ab"],
        "does not exist: pass the directory",
    ),
    "generate/shards as checkpoint": (
        lambda f: ["generate", f.shards, "--prompt", "ab"],
        "token shard directory",
    ),
    "generate/empty prompt": (lambda f: ["generate", f.ckpt, "--prompt", ""], "must not be empty"),
    "generate/non-UTF-8 prompt": (
        lambda f: ["generate", f.ckpt, "--prompt", "caf\udce9"],
        "not valid UTF-8",
    ),
    "evaluate/missing checkpoint": (
        lambda f: evaluate(f.missing, f.text, f),
        "does not exist: pass the directory",
    ),
    "evaluate/shards as checkpoint": (
        lambda f: evaluate(f.shards, f.text, f),
        "token shard directory",
    ),
    "evaluate/no input": (lambda f: evaluate(f.ckpt, None, f), "needs at least one input"),
    "evaluate/non-UTF-8 input": (lambda f: evaluate(f.ckpt, f.latin1, f), "is not UTF-8 text"),
    "evaluate/stream shorter than one bucket": (
        lambda f: evaluate(f.ckpt, f.text, f, "--stream-len", "10"),
        "shorter than the first position bucket [0, 32)",
    ),
    "evaluate/more streams than the text allows": (
        lambda f: evaluate(f.ckpt, f.text, f, "--streams", "1000"),
        "too few for 1000 disjoint streams",
    ),
    "evaluate/--json is a directory": (
        lambda f: [*evaluate(f.ckpt, f.text, f)[:-2], "--json", f.ckpt],
        "is a directory: pass a file name",
    ),
    "evaluate/STU checkpoint past max_len": (
        lambda f: evaluate(f.ckpt, f.text, f, "--stream-len", "65"),
        "can run at most max_len=64",
    ),
    "prepare-data/missing input": (
        lambda f: ["prepare-data", f.missing, "--out", f.new],
        "missing",
    ),
    "prepare-data/non-UTF-8 input": (
        lambda f: ["prepare-data", f.latin1, "--out", f.new],
        "is not UTF-8 text",
    ),
    "prepare-data/checkpoint as output": (
        lambda f: ["prepare-data", f.text, "--out", f.ckpt],
        "is not an empty directory",
    ),
    "prepare-data/missing tokenizer": (
        lambda f: ["prepare-data", f.text, "--out", f.new, "--tokenizer", f.missing],
        "missing",
    ),
    "prepare-data/part record names ../x.npy": (
        lambda f: ["prepare-data", f.text, "--out", f.interrupted, "--val-percent", "20"],
        "leaves its directory",
    ),
    "prepare-data/invalid JSON lines": (
        lambda f: ["prepare-data", f.bad_jsonl, "--out", f.new],
        "JSON",
    ),
    "prepare-data/an empty val split": (
        lambda f: ["prepare-data", f.latin1.replace("latin1.txt", "one.txt"), "--out", f.new],
        "the val split is empty",
    ),
    "prepare-data/--out holds a run with another tokenizer": (
        lambda f: ["prepare-data", f.text, "--out", f.shards, "--tokenizer", f.bpe],
        "prepare",
    ),
}


def snapshot(root):
    """Every file under ``root`` with its mtime and size; a checkpoint's writer lock only by
    name (each writer that opens the directory records itself there, see the report)."""
    return {
        str(p.relative_to(root)): None
        if p.name == LOCK_FILE
        else (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_rc_2_and_changes_nothing(fx, capsys, row):
    argv, phrase = ROWS[row]
    before = snapshot(fx.root)
    capsys.readouterr()
    assert main(argv(fx)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"spectral-jax {row.split('/')[0]}: error: "), lines[0]
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert snapshot(fx.root) == before


def test_debug_reraises_with_the_traceback(fx):
    with pytest.raises(ValueError, match="must not be empty"):
        main(["--debug", "generate", fx.ckpt, "--prompt", ""])


def test_a_message_of_several_lines_is_one_line():
    assert describe_input_error(ValueError("first\n  second\n")) == "first; second"
