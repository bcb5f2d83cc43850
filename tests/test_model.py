"""SpectralModel: config validation, shapes and parameter counts, causality, gradients,
bf16 activations, and prefill + step == forward (through attention-only configs)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.nn.model import ModelConfig, SpectralModel

TOL64 = 1e-12  # float64: only summation order differs
TOL32 = 1e-5  # float32: ~80 ulps of O(1) logits after 2 blocks of width-16 matmuls

HYBRID = ModelConfig(
    d_model=16, num_layers=2, max_len=32, vocab_size=11, layer_pattern="SA",
    num_filters=4, num_heads=2, window=4,
)  # fmt: skip


# jitted entry points: one compilation each per model structure, far cheaper than eager ops
forward = nnx.jit(lambda m, x: m(x))
prefill = nnx.jit(lambda m, x: m.prefill(x))
step = nnx.jit(lambda m, cache, x_t: m.step(cache, x_t))


def param_count(module) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_hybrid_lm_shapes_param_count_and_tying():
    model = SpectralModel(HYBRID, rngs=nnx.Rngs(0))
    assert HYBRID.layer_kinds == ("S", "A")
    assert type(model.blocks[0].mixer).__name__ == "STU"
    assert type(model.blocks[1].mixer).__name__ == "SlidingWindowAttention"
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 9)), jnp.int32)
    logits = forward(model, tokens)
    chex.assert_shape(logits, (2, 9, 11))
    chex.assert_type(logits, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(logits)))
    expected = (
        11 * 16  # embedding
        + sum(param_count(b) for b in model.blocks)
        + 16  # final norm
        + 16 * 11  # LM head, no bias
    )
    assert model.num_params() == expected
    tied = SpectralModel(dataclasses.replace(HYBRID, tie_embeddings=True), rngs=nnx.Rngs(0))
    assert model.num_params() - tied.num_params() == 16 * 11
    assert forward(tied, tokens).shape == (2, 9, 11)


def test_hybrid_model_is_causal_and_every_param_gets_gradient():
    model = SpectralModel(dataclasses.replace(HYBRID, tie_embeddings=True), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (1, 12)), jnp.int32)
    changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % 11)
    a, b = forward(model, tokens), forward(model, changed)
    # the past never sees the future; the STU's FFT convolution spreads float32 rounding of
    # the whole sequence over all positions, so "unchanged" means to within TOL32
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=TOL32, rtol=TOL32)
    assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-3

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    grads = nnx.jit(nnx.grad(loss))(model)
    for path, g in jax.tree.leaves_with_path(nnx.state(grads, nnx.Param)):
        assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def decode(model, x, prompt_len):
    """prefill x[:, :prompt_len], then step through the rest; returns [B, L, out]."""
    y, cache = prefill(model, x[:, :prompt_len])
    outs = [y]
    for t in range(prompt_len, x.shape[1]):
        cache, y_t = step(model, cache, x[:, t])
        outs.append(y_t[:, None])
    return jnp.concatenate(outs, axis=1)


def test_attention_only_lm_prefill_then_step_matches_call_float64():
    config = dataclasses.replace(HYBRID, attention_only=True, dtype="float64", tie_embeddings=True)
    assert config.layer_kinds == ("A", "A")
    model = SpectralModel(config, rngs=nnx.Rngs(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 13)), jnp.int32)
    with jax.enable_x64(True):
        full = forward(model, tokens)
        got = decode(model, tokens, 6)
    assert full.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=TOL64)


def test_attention_only_regression_jitted_steps_match_call_float32():
    config = ModelConfig(
        d_model=16, num_layers=2, max_len=10, d_input=3, d_output=2,
        attention_only=True, num_heads=2, window=3,
    )  # fmt: skip
    model = SpectralModel(config, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 10, 3)), jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit  # the functional style a decode loop uses: params as an explicit pytree
    def step_fn(state, cache, x_t):
        return nnx.merge(graphdef, state).step(cache, x_t)

    cache = model.init_cache(2)
    outs = []
    for t in range(10):
        cache, y_t = step_fn(state, cache, x[:, t])
        outs.append(y_t)
    full = forward(model, x)
    assert full.shape == (2, 10, 2)
    np.testing.assert_allclose(np.stack(outs, 1), full, atol=TOL32, rtol=TOL32)


def test_bfloat16_activations_float32_params_and_outputs():
    model32 = SpectralModel(HYBRID, rngs=nnx.Rngs(4))
    model16 = SpectralModel(dataclasses.replace(HYBRID, dtype=jnp.bfloat16), rngs=nnx.Rngs(4))
    assert model16.config.dtype == "bfloat16"  # dtypes are normalised to their names
    dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 11, (2, 16)), jnp.int32)
    y16, y32 = forward(model16, tokens), forward(model32, tokens)
    assert y16.dtype == jnp.float32
    # bf16 has 8 significant bits (eps 2^-8); two blocks of ~10 roundings each,
    # relative to the logit scale, stay within a few eps.
    err = float(jnp.max(jnp.abs(y16 - y32)) / jnp.max(jnp.abs(y32)))
    assert err < 16 * 2.0**-8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_input": 3}, "exactly one of vocab_size"),
        ({"vocab_size": None}, "exactly one of vocab_size"),
        ({"vocab_size": None, "d_input": 3}, "needs d_output"),
        ({"d_output": 2, "tie_embeddings": True}, "tie_embeddings=True needs"),
        ({"layer_pattern": "SX"}, "layer_pattern='SX'"),
        ({"layer_pattern": ""}, "layer_pattern=''"),
        ({"dtype": "int8"}, "ModelConfig.dtype must be one of .* got 'int8'"),
        ({"num_layers": 0}, "ModelConfig.num_layers must be an integer >= 1, got 0"),
        ({"d_hidden": -4}, "ModelConfig.d_hidden must be an integer >= 1, got -4"),
        ({"num_heads": 3}, "num_heads=3"),  # validated by the attention config
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(HYBRID, **overrides)


def test_bad_inputs_raise():
    config = dataclasses.replace(HYBRID, attention_only=True, max_len=8)
    model = SpectralModel(config, rngs=nnx.Rngs(5))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="tokens must be int"):
        model(tokens.astype(jnp.float32))
    assert model.length_limit is None  # attention only: any length, past max_len
    assert jax.eval_shape(model, jnp.zeros((2, 9), jnp.int32)).shape == (2, 9, 11)
    _, cache = prefill(model, tokens)
    cache, _ = model.step(cache, tokens[:, 0])  # position 8 = max_len: no limit either
    assert int(cache.pos) == 9
    hybrid = SpectralModel(dataclasses.replace(config, attention_only=False), rngs=nnx.Rngs(5))
    assert hybrid.length_limit == 8  # its STU layers' max_len
    with pytest.raises(ValueError, match=r"length 9 needs 9 positions, but block 0 \(STU\)"):
        hybrid(jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="ModelCache of 2 layer caches"):
        model.step(cache.layers[:1], tokens[:, 0])
    with pytest.raises(ValueError, match=r"tokens must be int \[B\]"):
        model.step(model.init_cache(2), tokens[:, :2])
    regression = SpectralModel(
        dataclasses.replace(config, vocab_size=None, d_input=3, d_output=1), rngs=nnx.Rngs(5)
    )
    with pytest.raises(ValueError, match=r"inputs must be \[B, L, 3\]"):
        regression(jnp.zeros((2, 8, 4)))


def test_stu_layers_share_one_copy_of_the_filters():
    config = dataclasses.replace(HYBRID, layer_pattern="S", stu_projection="tensordot")
    model = SpectralModel(config, rngs=nnx.Rngs(6))
    assert model.blocks[0].mixer.filters is model.blocks[1].mixer.filters
    filters = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert [f.shape for f in filters] == [(32, 4)]  # [max_len, num_filters], not trained


def test_remat_gives_the_same_loss_and_gradients_float64():
    # Rematerialization recomputes the same float64 operations; only XLA's fusion of the
    # recomputed ops may differ, so loss and gradients agree to TOL64 (round-off of sums
    # over 2 x 12 positions and width-16 matmuls, ~1e-15 each).
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 12)), jnp.int32)

    def loss(model):
        logits = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    with jax.enable_x64(True):
        reference = SpectralModel(dataclasses.replace(HYBRID, dtype="float64"), rngs=nnx.Rngs(2))
        state = jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(reference))
        nnx.update(reference, state)
        ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss))(reference)
        for remat in ("full", "save_dots"):
            config = dataclasses.replace(HYBRID, dtype="float64", remat=remat)
            model = SpectralModel(config, rngs=nnx.Rngs(5))
            nnx.update(model, state)
            assert "remat" in str(jax.make_jaxpr(nnx.grad(loss))(model))  # really rematerialized
            value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
            np.testing.assert_allclose(value, ref_loss, rtol=TOL64)
            chex.assert_type(jax.tree.leaves(grads), jnp.float64)
            chex.assert_trees_all_close(grads, ref_grads, rtol=TOL64, atol=TOL64)
    with pytest.raises(ValueError, match=r"ModelConfig.remat must be one of .*'save_dots'"):
        dataclasses.replace(HYBRID, remat="save-dots")
