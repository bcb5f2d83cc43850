"""decode_plan: each strategy name becomes the model and DecodeOptions that decode it."""

from __future__ import annotations

import pytest
from flax import nnx

from spectral_jax.decode.strategy import decode_plan
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.validation import GENERATION_STRATEGIES

STATES = 16  # LDS states: few, so the fits are fast
HYBRID = ModelConfig(
    d_model=16, num_layers=2, max_len=32, vocab_size=32, num_filters=4, layer_pattern="SA",
    num_heads=2, window=8,
)  # fmt: skip


def layers(module: nnx.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for _, m in nnx.iter_modules(module))


@pytest.fixture(scope="module")
def model() -> SpectralModel:
    return SpectralModel(HYBRID, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def distilled(model) -> nnx.Module:
    return distill_model(model, num_states=STATES).model


def test_the_names_are_the_stu_strategies_and_lds():
    assert GENERATION_STRATEGIES == ("naive", "futurefill", "lds")


@pytest.mark.parametrize("strategy", ["naive", "futurefill"])
def test_stu_strategies_decode_the_model_itself_with_their_options(model, strategy):
    plan = decode_plan(model, strategy)
    assert plan.model is model
    assert plan.options == DecodeOptions(strategy)
    assert plan.banks is None


def test_lds_distills_a_model_with_stu_layers_and_keeps_the_bank_reports(model):
    plan = decode_plan(model, "lds", num_states=STATES)
    assert plan.model is not model
    assert layers(plan.model, STU) == 0 and layers(plan.model, LDSLayer) == 1
    assert layers(model, STU) == 1  # the model itself is left as it was
    assert plan.options == DEFAULT_DECODE
    assert [(b["L"], b["K"], b["layers"], b["num_states"]) for b in plan.banks] == [
        (32, 4, 1, STATES)
    ]


def test_lds_takes_the_distilled_copy_the_caller_passes(model, distilled):
    plans = {s: decode_plan(model, s, distilled=distilled) for s in GENERATION_STRATEGIES}
    assert plans["lds"].model is distilled and plans["lds"].banks is None
    assert plans["naive"].model is model and plans["futurefill"].model is model
    # an already distilled model, or one without STU layers, decodes with lds as it is
    assert decode_plan(distilled, "lds").model is distilled
    attention = SpectralModel(
        ModelConfig(**{**vars(HYBRID), "layer_pattern": "A"}), rngs=nnx.Rngs(0)
    )
    assert decode_plan(attention, "lds").model is attention
    assert decode_plan(attention, "naive").model is attention


def test_one_layer_plans_like_a_model():
    stu = STU(STUConfig(d_in=16, d_out=16, max_len=32, num_filters=4), rngs=nnx.Rngs(0))
    lds = LDSLayer.from_stu(stu, num_states=STATES)
    assert decode_plan(stu, "naive").model is stu
    assert decode_plan(stu, "lds", distilled=lds).model is lds
    with pytest.raises(ValueError, match=r"bare STU .* pass distilled=LDSLayer.from_stu\(stu\)"):
        decode_plan(stu, "lds")
    with pytest.raises(ValueError, match=r"it has LDS layers.*use strategy 'lds'"):
        decode_plan(lds, "futurefill")


def test_bad_plans_say_what_to_do(model, distilled):
    with pytest.raises(ValueError, match=r"SpectralModel is distilled .* use strategy 'lds'"):
        decode_plan(distilled, "naive")
    with pytest.raises(ValueError, match="distilled copy still has STU layers"):
        decode_plan(model, "lds", distilled=model)
    with pytest.raises(ValueError, match=r"decode_plan.strategy must be one of .*'lds'"):
        decode_plan(model, "exact")
