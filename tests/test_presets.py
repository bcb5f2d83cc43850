"""Named runs, overrides and the `spectral-jax train` command."""

import json

import numpy as np
import pytest

from spectral_jax.cli import main
from spectral_jax.train import train
from spectral_jax.train.presets import PRESETS, apply_overrides, preset


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        config = preset(name)
        assert config.model is not None and config.steps > 0


def test_overrides_parse_by_field_type():
    config = apply_overrides(
        preset("lds_small"),
        [
            "steps=7",
            "model.d_model=24",
            "optim.learning_rate=1e-3",
            "model.tie_embeddings=false",
            "model.stu_projection=tensordot",
            "task.noise_std=0",
        ],
    )
    assert config.steps == 7 and config.model.d_model == 24
    assert config.optim.learning_rate == 1e-3 and config.task.noise_std == 0.0
    assert isinstance(config.task.noise_std, float)
    assert config.model.stu_projection == "tensordot"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.d_modl=3", "unknown config key 'model.d_modl'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("steps.x=1", "has no fields"),
        ("model=1", "is a group"),
        ("steps", "not of the form key=value"),
        ("model.tie_embeddings=maybe", "expected true or false"),
        ("steps=-3", "steps must be a positive int"),
        ("model.stu_projection=outer", "projection must be one of"),
    ],
)
def test_bad_overrides_raise(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(preset("lds_small"), [override])


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        preset("big")


def test_lds_small_reaches_a_tenth_of_its_initial_loss():
    result = train(preset("lds_small"))
    losses = [r["loss"] for r in result.history if r["split"] == "train"]
    final_eval = [r["loss"] for r in result.history if r["split"] == "eval"][-1]
    assert result.step == 300
    assert final_eval <= 0.1 * losses[0], (losses[0], final_eval)


def test_train_command_writes_metrics_and_rejects_bad_keys(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    args = [
        "train",
        "lds_small",
        "--set",
        "steps=3",
        "--set",
        "model.num_layers=1",
        "--metrics",
        str(metrics),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert main(["train", "lds_small", "--set", "model.widht=3"]) == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_bytes_small_validation_bits_per_byte_fall():
    """The first 600 steps of lm_bytes_small (the full preset runs 2000 steps, ~10 minutes)."""
    config = apply_overrides(preset("lm_bytes_small"), ["steps=600", "eval_every=300"])
    history = train(config).history
    bpb = [r["bits_per_byte"] for r in history if r["split"] == "eval"]
    first_loss_bits = next(r["loss"] for r in history if r["split"] == "train") / np.log(2)
    assert len(bpb) == 2 and bpb[1] < bpb[0] < first_loss_bits, (first_loss_bits, bpb)
