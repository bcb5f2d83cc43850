"""Named runs, overrides and the `spectral-jax train` command."""

import json

import numpy as np
import pytest

from spectral_jax.apps.cli import main
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
        ("steps=-3", r"TrainConfig\.steps must be an integer >= 1"),
        ("model.stu_projection=outer", "projection must be one of"),
    ],
)
def test_bad_overrides_raise(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(preset("lds_small"), [override])


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        preset("big")


@pytest.mark.slow  # 300 steps (~20 s); tests/test_loop.py trains a smaller run in the suite
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


def _abstract_count(model_config) -> int:
    import jax
    from flax import nnx

    from spectral_jax.nn.model import SpectralModel

    # abstract shapes only: nothing is allocated
    abstract = nnx.eval_shape(lambda: SpectralModel(model_config, rngs=nnx.Rngs(0)))
    count = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == abstract.num_params()
    return count


def test_flashstu_pod_is_flash_stu_2s_training_architecture():
    from spectral_jax.interop.flashstu import flashstu_config

    config = preset("flashstu_pod")
    flash = flashstu_config(config.model)  # what export writes
    assert {k: flash[k] for k in ("n_embd", "n_layers", "window_size", "mlp_scale")} == {
        "n_embd": 1536,
        "n_layers": 26,
        "window_size": 1024,
        "mlp_scale": 12,
    }
    assert (flash["softcap"], flash["use_approx"], flash["use_attn"]) == (50.0, True, True)
    assert (flash["vocab_size"], flash["num_eigh"], flash["n_heads"]) == (200_064, 24, 8)
    assert config.model.attention_positions == "alibi" and config.model.tie_embeddings
    # by hand: tied embedding 200064 x 1536; per layer GeGLU 3 x 1536 x 18432 and 2 norms;
    # 13 approx STU (M_inputs 1536^2, one shared M_filters 24 x 1536), 13 attention
    # (c_attn 3 x 1536^2, c_proj 1536^2), no biases; final norm
    d = 1536
    hand = 200_064 * d + 26 * (3 * d * 12 * d + 2 * d) + 13 * (d * d + 24 * d) + 13 * 4 * d * d + d
    assert _abstract_count(config.model) == hand == 2_669_514_240


def test_pod_preset_is_flash_stus_architecture_at_340m():
    import jax

    from spectral_jax.train.sharding import logical_partition_spec

    config = preset("lm_tokens_tpu_pod")
    model = config.model
    assert model.layer_kinds == ("S", "A") * 6 and model.max_len == config.task.seq_len == 8192
    assert model.remat == "full" and config.microbatches == 2 and model.dtype == "bfloat16"
    assert (model.mlp_activation, model.attention_positions) == ("geglu", "alibi")
    assert model.stu_shared_mixture and model.attention_softcap == 50.0
    count = _abstract_count(model)
    # by hand: tied embedding 200064 x 1024; per layer GeGLU 3 x 1024 x 3072 and 2 norms;
    # 6 STU (M_in 1024^2, one shared M_filt 24 x 1024), 6 attention (4 x 1024^2); final norm
    hand = (
        200_064 * 1024
        + 12 * (3 * 1024 * 3072 + 2 * 1024)
        + 6 * (1024 * 1024 + 24 * 1024)
        + 6 * 4 * 1024 * 1024
        + 1024
    )
    assert count == hand and 330e6 < count < 350e6
    # the embedding rows divide FSDP sizes up to 64
    assert logical_partition_spec(("vocab", "embed"), (200_064, 1024), {"fsdp": 64}) == (
        jax.sharding.PartitionSpec("fsdp")
    )
    # it reads a user's shards and tokenizer, given by overrides
    pod = apply_overrides(config, ["task.path=gs://bucket/shards", "task.tokenizer=tok.json"])
    assert type(pod.task).__name__ == "TokenShardLM"
    assert (pod.task.path, pod.task.tokenizer) == ("gs://bucket/shards", "tok.json")
