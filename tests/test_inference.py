"""Distilled checkpoints: write, reload, and the `spectral-jax distill` command."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.apps.cli import main
from spectral_jax.apps.inference import distill_checkpoint
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.train import CheckpointConfig, CheckpointError, load_for_inference, train
from spectral_jax.train.config import task_from_record
from spectral_jax.train.presets import apply_overrides, lds_small


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step lds_small run with a checkpoint (the model is small: 1 layer, L=64)."""
    directory = str(tmp_path_factory.mktemp("run") / "ckpt")
    config = apply_overrides(
        lds_small(), ["steps=2", "model.num_layers=1", "model.max_len=64", "task.seq_len=64"]
    )
    train(dataclasses.replace(config, checkpoint=CheckpointConfig(directory, async_save=False)))
    return directory


def test_distilled_checkpoint_round_trip(trained, tmp_path):
    out = str(tmp_path / "distilled")
    report = distill_checkpoint(trained, out, num_states=40)
    # L=64, K=16, 40 states: the fit is at its float64 floor for this size (~1e-5 on the
    # smallest filters); model outputs inherit that relative error.
    assert report["stu_layers"] == 1 and report["rel_err"] < 1e-4
    assert report["banks"][0]["num_states"] == 40

    source, _ = load_for_inference(trained)
    distilled, meta = load_for_inference(out)
    assert isinstance(distilled.blocks[0].mixer, LDSLayer)
    assert meta["distill"]["source"] == trained
    # plain float32 is the default arithmetic, recorded in the checkpoint
    assert meta["distill"]["arithmetic"] == report["arithmetic"] == "plain"
    task = task_from_record(meta["run"])
    x = jnp.asarray(task.batch(seed=1, step=0, rows=range(2), split="eval").inputs)
    y_stu, y_lds = np.asarray(source(x)), np.asarray(distilled(x))
    assert np.linalg.norm(y_lds - y_stu) <= 1e-4 * np.linalg.norm(y_stu)
    # Loading reproduces the arrays that were saved (not a fresh fit with other parameters).
    saved = nnx.to_pure_dict(nnx.state(distilled, nnx.Param))
    assert jnp.allclose(
        saved["blocks"][0]["mixer"]["M_plus"],
        nnx.to_pure_dict(nnx.state(source, nnx.Param))["blocks"][0]["mixer"]["M_plus"],
    )


def test_distill_refuses_to_overwrite_or_redistill(trained, tmp_path):
    out = str(tmp_path / "d")
    distill_checkpoint(trained, out, num_states=40)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        distill_checkpoint(trained, out, num_states=40)
    with pytest.raises(ValueError, match="already a distilled checkpoint"):
        distill_checkpoint(out, str(tmp_path / "e"), num_states=40)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(str(tmp_path / "missing"))


def test_distill_command_prints_the_report(trained, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["distill", trained, out, "--num-states", "40"]) == 0
    printed = capsys.readouterr().out
    assert "distilled 1 STU layer(s)" in printed and "relative error" in printed
    assert main(["distill", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
