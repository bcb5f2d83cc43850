"""Checkpoint faults: fall-back past damaged steps, and one writer per run directory.

The lock test needs a second process; this file doubles as its script
(``python test_checkpoint_faults.py CKPT_DIR``: hold the directory as a writer until killed).
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from spectral_jax.train import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    load_for_inference,
    load_model,
    train,
)
from spectral_jax.train.checkpoint import CORRUPT_DIR, LOCK_FILE
from spectral_jax.train.presets import apply_overrides, lds_small

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(run: pathlib.Path, steps: int):
    """A 1-layer lds_small run in ``run``, saving every step (all kept)."""
    overrides = ["model.num_layers=1", "model.max_len=32", "task.seq_len=32", "eval_batches=0"]
    config = apply_overrides(lds_small(), [f"steps={steps}", "log_every=1", *overrides])
    return dataclasses.replace(
        config,
        metrics_path=str(run / "metrics.jsonl"),
        checkpoint=CheckpointConfig(str(run / "ckpt"), save_every=1, keep=5, async_save=False),
    )


def _records(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses_after_last_resume(run: pathlib.Path) -> dict[int, float]:
    records = _records(run)
    resumes = [i for i, r in enumerate(records) if r.get("event") == "resume"]
    start = resumes[-1] + 1 if resumes else 0
    return {r["step"]: r["loss"] for r in records[start:] if r.get("split") == "train"}


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _largest(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_an_array_file(step: pathlib.Path) -> None:
    path = _largest(step / "model")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_an_array_file(step: pathlib.Path) -> None:
    _largest(step / "optimizer").unlink()


def _corrupt_the_meta_json(step: pathlib.Path) -> None:
    (step / "meta" / "metadata").write_text('{"step": 3, "run": ')


def _remove_an_item(step: pathlib.Path) -> None:
    shutil.rmtree(step / "optimizer")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run's losses, and a 3-step run (steps 1-3 saved) to damage."""
    reference, base = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("base")
    train(_config(reference, 4))
    train(_config(base, 3))
    return _losses_after_last_resume(reference), base


def _copy(base: pathlib.Path, run: pathlib.Path) -> pathlib.Path:
    shutil.copytree(base / "ckpt", run / "ckpt")
    return run / "ckpt"


@pytest.mark.parametrize(
    "damage",
    [_truncate_an_array_file, _delete_an_array_file, _corrupt_the_meta_json, _remove_an_item],
)
def test_damaged_newest_is_moved_aside_and_training_resumes_from_the_one_before(
    runs, tmp_path, damage
):
    reference, base = runs
    ckpt_dir = _copy(base, tmp_path)
    damage(ckpt_dir / "3")
    damaged = _snapshot(ckpt_dir / "3")
    with pytest.warns(UserWarning, match=r"step 3 .* damaged and was moved to .*corrupt/3-"):
        train(_config(tmp_path, 4))
    with Checkpointer(CheckpointConfig(str(ckpt_dir))) as ckpt:  # a writer's view after moving
        assert ckpt.restore_meta()["step"] == 4 and ckpt.all_steps() == [1, 2, 3, 4]
    # The damaged step is preserved, byte for byte, where orbax never lists it.
    (moved,) = (ckpt_dir / CORRUPT_DIR).iterdir()
    assert moved.name.startswith("3-") and _snapshot(moved) == damaged
    with Checkpointer(CheckpointConfig(str(ckpt_dir)), read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3, 4]  # step 3 saved anew, beside the moved one
    events = [r for r in _records(tmp_path) if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("checkpoint_fallback", 3), ("resume", 2)]
    assert events[0]["moved_to"] == str(moved) and "could not be restored" in events[0]["reason"]
    # Batches are a pure function of (seed, step, row): bitwise the uninterrupted losses.
    assert _losses_after_last_resume(tmp_path) == {3: reference[3], 4: reference[4]}


def test_a_writer_saves_a_moved_step_anew(tmp_path):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)}
    with Checkpointer(CheckpointConfig(str(tmp_path), async_save=False)) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.full(2, float(step))}, None, {})
        _corrupt_the_meta_json(tmp_path / "2")
        with pytest.warns(UserWarning, match=r"step 2 .* moved to"):
            model, _, meta = ckpt.restore(abstract)
        assert meta["step"] == 1 and ckpt.all_steps() == [1]
        ckpt.save(2, {"w": model["w"] + 1}, None, {})
        assert ckpt.all_steps() == [1, 2]
        model, _, meta = ckpt.restore(abstract)  # the new step 2, no warning
        assert meta["step"] == 2 and model["w"].tolist() == [2.0, 2.0]


def test_no_good_checkpoint_is_a_clear_error_naming_each_step(runs, tmp_path):
    _, base = runs
    ckpt_dir = _copy(base, tmp_path)
    for step in (1, 2, 3):
        _truncate_an_array_file(ckpt_dir / str(step))
    reasons = r"step 3: .* could not be restored.*; step 2: .*; step 1: .* could not be restored"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step is reported as set aside
        with pytest.raises(
            CheckpointError, match=rf"{ckpt_dir} holds no good checkpoint \(nothing was moved"
        ) as err:
            train(_config(tmp_path, 4))
    assert re.search(reasons, str(err.value))
    # with no good step the likelier cause is a run that does not fit: nothing is moved
    assert not (ckpt_dir / CORRUPT_DIR).exists()
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == list("123")


def test_read_only_loads_fall_back_without_moving_anything(runs, tmp_path):
    _, base = runs
    ckpt_dir = _copy(base, tmp_path)
    _truncate_an_array_file(ckpt_dir / "3")
    expected, _ = load_model(str(ckpt_dir), step=2)
    # Read-only users take no lock: they load while a writer holds the directory.
    with Checkpointer(CheckpointConfig(str(ckpt_dir))):
        before = _snapshot(ckpt_dir)  # the lock file names this writer
        for load in (load_model, load_for_inference):
            with pytest.warns(UserWarning, match=r"step 3 .* skipped \(read-only: not moved\)"):
                model, meta = load(str(ckpt_dir))
            assert meta["step"] == 2
            chex.assert_trees_all_equal(nnx.state(model), nnx.state(expected))
        assert _snapshot(ckpt_dir) == before
    assert not (ckpt_dir / CORRUPT_DIR).exists()


def _hold(directory: str) -> None:
    """Hold ``directory`` as a writer until killed."""
    with Checkpointer(CheckpointConfig(directory)):
        print("holding", flush=True)
        time.sleep(600)


def test_one_writer_per_directory_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, __file__, str(ckpt_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        named = rf"in use by another writer \(.*\"pid\": {holder.pid}, \"host\": .*\"started\": "
        with pytest.raises(CheckpointError, match=named):
            Checkpointer(CheckpointConfig(str(ckpt_dir)))
        with pytest.raises(CheckpointError, match=named):
            train(_config(tmp_path, 1))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    with Checkpointer(CheckpointConfig(str(ckpt_dir))):  # the kernel released the lock
        holder_now = json.loads((ckpt_dir / LOCK_FILE).read_text())
    assert holder_now["pid"] == os.getpid()


if __name__ == "__main__":
    _hold(sys.argv[1])
