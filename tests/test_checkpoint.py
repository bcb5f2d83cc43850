"""Checkpoints: round trip, clear errors, and exact resume after SIGKILL.

The SIGKILL tests run training in subprocesses; this file doubles as their script
(``python test_checkpoint.py MODE OUT_DIR``). The model has dropout, so its RNG
stream is part of the state that must survive the restart.
"""

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from orbax.checkpoint.path import atomicity

from spectral_jax.data import tasks as data_module
from spectral_jax.data.tasks import LDSRegression
from spectral_jax.train import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    OptimConfig,
    TrainConfig,
    train,
)
from spectral_jax.train.checkpoint import abstract_like

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tree():
    return {"w": jnp.arange(6.0).reshape(2, 3), "rng": jax.random.key(7), "step": jnp.array(3)}


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract_like(tree, jax.tree.map(lambda _: sharding, tree))


def _save(directory, steps, keep=3):
    with Checkpointer(CheckpointConfig(str(directory), keep=keep)) as ckpt:
        for step in steps:
            ckpt.save(step, _tree(), {"count": jnp.array(step)}, {"note": f"s{step}"})
        ckpt.wait()


def test_round_trip_restores_arrays_keys_and_metadata(tmp_path):
    _save(tmp_path / "ck", [1, 2, 3, 4], keep=2)
    with Checkpointer(CheckpointConfig(str(tmp_path / "ck")), read_only=True) as ckpt:
        assert ckpt.all_steps() == [3, 4]  # keep the last 2
        model, opt, meta = ckpt.restore(_abstract(_tree()), _abstract({"count": jnp.array(0)}))
        assert meta == {"note": "s4", "step": 4, "format_version": 1}
        chex.assert_trees_all_equal(model, _tree())  # the PRNG key too: its data and impl
        assert int(opt["count"]) == 4
        model_only, no_opt, _ = ckpt.restore(_abstract(_tree()), step=3)
        assert no_opt is None and int(model_only["step"]) == 3
        with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 1 .* \[3, 4\]"):
            ckpt.restore(_abstract(_tree()), step=1)


def test_opening_for_reading_logs_no_warning(tmp_path, caplog):
    """`spectral-jax generate` / `distill` open checkpoints read-only: no warning line for it."""
    _save(tmp_path / "ck", [1])
    with caplog.at_level(logging.WARNING):
        with Checkpointer(CheckpointConfig(str(tmp_path / "ck")), read_only=True) as ckpt:
            ckpt.restore(_abstract(_tree()))
    assert [r.getMessage() for r in caplog.records] == []
    with caplog.at_level(logging.WARNING, logger="absl"):  # other absl warnings still pass
        logging.getLogger("absl").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_missing_file_or_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpointer(CheckpointConfig(str(tmp_path / "nope")), read_only=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpointer(CheckpointConfig(str(tmp_path / "file")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        Checkpointer(CheckpointConfig(str(tmp_path / "empty")), read_only=True)


def test_corrupt_checkpoint_is_a_clear_error_naming_the_fallback(tmp_path):
    _save(tmp_path / "ck", [1, 2])
    for path in (tmp_path / "ck" / "2" / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with Checkpointer(CheckpointConfig(str(tmp_path / "ck")), read_only=True) as ckpt:
        with pytest.raises(CheckpointError, match=r"step 2 .* corrupt"):
            ckpt.restore(_abstract(_tree()), _abstract({"count": jnp.array(0)}), step=2)
        with pytest.warns(UserWarning, match=r"step 2 .* damaged .*next newest"):
            *_, meta = ckpt.restore(_abstract(_tree()), _abstract({"count": jnp.array(0)}))
        assert meta["step"] == 1  # the latest falls back to the named step


def test_partial_save_directories_are_never_loaded(tmp_path):
    _save(tmp_path / "ck", [1])
    partial = tmp_path / "ck" / f"2{atomicity.TMP_DIR_SUFFIX}-1234"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "junk").write_text("half written")
    with Checkpointer(CheckpointConfig(str(tmp_path / "ck")), read_only=True) as ckpt:
        assert ckpt.all_steps() == [1]
    # A writer clears it away before its first save, and saves that step anew.
    _save(tmp_path / "ck", [2])
    assert not partial.exists()
    with Checkpointer(CheckpointConfig(str(tmp_path / "ck")), read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]


def test_bad_checkpoint_config_names_the_field():
    with pytest.raises(ValueError, match="save_every"):
        CheckpointConfig("d", save_every=0)
    with pytest.raises(ValueError, match="keep"):
        CheckpointConfig("d", keep=0)
    with pytest.raises(ValueError, match="keep"):  # a bool is not a count
        CheckpointConfig("d", keep=True)
    with pytest.raises(ValueError, match="directory"):
        CheckpointConfig("")


# ---------------------------------------------------------------------------- SIGKILL

STEPS, SAVE_EVERY = 8, 3  # checkpoints at steps 3, 6 and 8


class TinyRegressor(nnx.Module):
    """Linear -> dropout -> causal running mean -> linear: [B, L, 2] -> [B, L, 2]."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(2, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        h = self.drop(jax.nn.gelu(self.inp(x)))
        return self.out(jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[:, None])


def _worker(mode: str, out_dir: str) -> None:
    out = pathlib.Path(out_dir)
    ckpt_dir = out / "ckpt"
    if mode == "kill-after-save":  # SIGKILL while training step 5, once step 3 is saved
        original = data_module.LDSRegression.batch

        def batch(self, seed, step, rows, split="train"):
            if split == "train" and step == 4:
                while not (ckpt_dir / "3").is_dir():
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, seed, step, rows, split)

        data_module.LDSRegression.batch = batch
    elif mode == "kill-mid-save":  # SIGKILL when step 6's files are written, before commit
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == "6":
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    config = TrainConfig(
        task=LDSRegression(seq_len=16, d_input=2, d_output=2, state_dim=4),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=20),
        steps=STEPS,
        global_batch=4,
        log_every=1,
        eval_batches=1,
        metrics_path=str(out / "metrics.jsonl"),
        checkpoint=CheckpointConfig(str(ckpt_dir), save_every=SAVE_EVERY, keep=2),
    )
    train(config, model_fn=TinyRegressor)


def _start(mode: str, out_dir: pathlib.Path, cache_dir: pathlib.Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        # Later runs load the executables the first one compiled: faster, same programs.
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(out_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait(proc: subprocess.Popen, returncode: int) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == returncode, out.decode()
    return out.decode()


def _losses_after_last_resume(path: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    resumes = [i for i, r in enumerate(records) if r.get("event") == "resume"]
    start = resumes[-1] + 1 if resumes else 0
    return {r["step"]: r["loss"] for r in records[start:] if r.get("split") == "train"}


def test_sigkill_after_a_checkpoint_and_mid_save_then_resume_is_exact(tmp_path):
    cache = tmp_path / "jax-cache"
    ref, after, mid = tmp_path / "ref", tmp_path / "after", tmp_path / "mid"
    _wait(_start("plain", ref, cache), 0)  # uninterrupted; fills the compilation cache
    killed = [_start("kill-after-save", after, cache), _start("kill-mid-save", mid, cache)]
    for proc in killed:
        _wait(proc, -signal.SIGKILL)
    # Killed mid-save: step 6 exists only as an uncommitted temporary directory.
    leftovers = sorted(p.name for p in (mid / "ckpt").iterdir())
    assert leftovers[0] == "3" and leftovers[1].startswith("6" + atomicity.TMP_DIR_SUFFIX)
    assert sorted(p.name for p in (after / "ckpt").iterdir()) == ["3", "writer.lock"]
    resumed = [_start("plain", after, cache), _start("plain", mid, cache)]
    outputs = [_wait(proc, 0) for proc in resumed]
    reference = _losses_after_last_resume(ref / "metrics.jsonl")
    assert sorted(reference) == list(range(1, STEPS + 1))
    for out_dir, output in zip((after, mid), outputs, strict=True):
        assert "resumed from step 3" in output  # the partial step 6 was not loaded
        losses = _losses_after_last_resume(out_dir / "metrics.jsonl")
        assert sorted(losses) == list(range(4, STEPS + 1))
        # Same programs, same state, same batches: bitwise equal on CPU.
        assert losses == {step: reference[step] for step in losses}
        assert sorted(p.name for p in (out_dir / "ckpt").iterdir()) == ["6", "8", "writer.lock"]


def test_training_on_a_corrupt_checkpoint_directory_fails_clearly(tmp_path):
    config = TrainConfig(
        task=LDSRegression(seq_len=8, d_input=2, d_output=2, state_dim=2),
        steps=2,
        global_batch=2,
        eval_batches=0,
        checkpoint=CheckpointConfig(str(tmp_path / "ckpt"), save_every=1),
    )
    train(config, model_fn=TinyRegressor)
    for path in (tmp_path / "ckpt").glob("[0-9]*/optimizer/**/*"):  # every step is damaged
        if path.is_file():
            path.write_bytes(b"\x00")
    longer = dataclasses.replace(config, steps=4)
    reasons = r"no good checkpoint .*: step 2: .* could not be restored.*; step 1: .* could not be"
    with pytest.raises(CheckpointError, match=reasons):
        train(longer, model_fn=TinyRegressor)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
