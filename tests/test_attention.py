"""Sliding-window attention: pure functions vs a naive loop, decode path vs parallel path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.nn.attention import (
    AttentionConfig,
    SlidingWindowAttention,
    rope,
    sliding_window_attention,
)
from spectral_jax.ops.conv_decode import check_room

# float64 paths differ only in summation order: a few ulps of O(1) values.
TOL64 = 1e-12
# float32: three matmuls of width <= 32 plus a softmax, each rounding ~sqrt(32) * 2^-24
# relative on O(1) values; 1e-5 is ~80 ulps, with room for the differently ordered sums.
TOL32 = 1e-5


def naive_window_attention(q, k, v, window):
    """Loop reference. q, k, v: [B, L, H, Dh] numpy (q already scaled)."""
    length = q.shape[1]
    out = np.zeros_like(v)
    for t in range(length):
        lo = max(0, t - window + 1)
        logits = np.einsum("bhd,bkhd->bhk", q[:, t], k[:, lo : t + 1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, t] = np.einsum("bhk,bkhd->bhd", p, v[:, lo : t + 1])
    return out


@pytest.mark.parametrize(
    "length, window",
    [(7, 16), (12, 6), (23, 5), (20, 1)],  # dense (L <= 2W) and blocked (L > 2W) paths
)
def test_sliding_window_attention_matches_naive_loop(length, window):
    rng = np.random.default_rng(length * 100 + window)
    q, k, v = (rng.standard_normal((2, length, 3, 4)) for _ in range(3))
    with jax.enable_x64(True):
        got = np.asarray(sliding_window_attention(*map(jnp.asarray, (q, k, v)), window))
    np.testing.assert_allclose(got, naive_window_attention(q, k, v, window), atol=TOL64)


def test_rope_preserves_norm_and_depends_on_relative_position():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)))
        k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)))

        def score(m, n):
            qm = rope(q, jnp.array([m]), 10_000.0)
            kn = rope(k, jnp.array([n]), 10_000.0)
            return float(jnp.sum(qm * kn)), float(jnp.linalg.norm(qm))

        s1, norm = score(3, 1)
        s2, _ = score(42, 40)
        s3, _ = score(5, 1)
        q_norm = float(jnp.linalg.norm(q))
    assert norm == pytest.approx(q_norm, abs=TOL64)
    assert s1 == pytest.approx(s2, abs=TOL64)
    assert abs(s1 - s3) > 1e-3  # a different offset gives a different score


# jitted entry points: one compilation each, far cheaper than many small eager ops
forward = nnx.jit(lambda m, x: m(x))
prefill = nnx.jit(lambda m, x: m.prefill(x))
step = nnx.jit(lambda m, cache, x_t: m.step(cache, x_t))


def decode(layer, x, prompt_len):
    """prefill on x[:, :prompt_len] then step through the rest; returns [B, L, D]."""
    y, cache = prefill(layer, x[:, :prompt_len])
    outs = [y]
    for t in range(prompt_len, x.shape[1]):
        cache, y_t = step(layer, cache, x[:, t])
        outs.append(y_t[:, None])
    assert int(cache.pos) == x.shape[1]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("prompt_len", [3, 9])  # prompt shorter / longer than the window
def test_prefill_then_step_matches_call_float64(prompt_len):
    config = AttentionConfig(d_model=16, num_heads=2, window=6, max_len=32, dtype=jnp.float64)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, 20, 16))
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        full = forward(layer, x)
        got = decode(layer, x, prompt_len)
    assert full.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=TOL64)


def test_jitted_steps_from_empty_cache_match_call_float32():
    config = AttentionConfig(d_model=16, num_heads=4, window=5, max_len=12)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 12, 16)), jnp.float32)
    graphdef, state = nnx.split(layer)

    @jax.jit  # the functional style a decode loop uses: params as an explicit pytree
    def step_fn(state, cache, x_t):
        return nnx.merge(graphdef, state).step(cache, x_t)

    cache = layer.init_cache(3, 12, jnp.float32)
    assert cache.k.shape == (3, 5, 4, 4)  # ring buffer: window slots, not max_len
    outs = []
    for t in range(12):
        cache, y_t = step_fn(state, cache, x[:, t])
        outs.append(y_t)
    np.testing.assert_allclose(np.stack(outs, 1), forward(layer, x), atol=TOL32, rtol=TOL32)
    with pytest.raises(Exception, match="cache is full"):  # runtime error under jit
        jax.block_until_ready(step_fn(state, cache, x[:, 0]))


def test_bfloat16_activations_keep_float32_params():
    config = AttentionConfig(d_model=16, num_heads=2, window=4, max_len=16)
    layer32 = SlidingWindowAttention(config, rngs=nnx.Rngs(3))
    layer16 = SlidingWindowAttention(
        dataclasses.replace(config, dtype=jnp.bfloat16), rngs=nnx.Rngs(3)
    )
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 10, 16)), jnp.float32)
    y16, y32 = forward(layer16, x), forward(layer32, x)
    assert y16.dtype == jnp.bfloat16
    assert layer16.qkv.kernel[...].dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.0039); a dozen roundings through two
    # width-16 matmuls and the softmax leave a few eps relative to the output scale.
    err = jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32))
    assert float(err) < 8 * 2.0**-8


def test_bad_inputs_raise():
    config = AttentionConfig(d_model=8, num_heads=2, window=3, max_len=4)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 8))
    _, cache = prefill(layer, x)
    with pytest.raises(ValueError, match="cache is full: position 4 >= max_len=4"):
        layer.step(cache, x[:, 0])
    _, cache = prefill(layer, x[:, :2])
    with pytest.raises(ValueError, match="x_t must be"):
        layer.step(cache, jnp.ones((3, 8)))  # batch mismatch
    with pytest.raises(ValueError, match="dtype"):
        layer.step(cache, jnp.ones((2, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="length 5"):
        layer(jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match=r"x must be \[B, L, 8\]"):
        layer(jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match="max_len=9"):
        layer.init_cache(2, 9, jnp.float32)
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=8"):
        AttentionConfig(d_model=8, num_heads=3, window=2, max_len=4)
    with pytest.raises(ValueError, match="must be even"):
        AttentionConfig(d_model=6, num_heads=2, window=2, max_len=4)
    with pytest.raises(ValueError, match="window=0"):
        AttentionConfig(d_model=8, num_heads=2, window=0, max_len=4)
    with pytest.raises(ValueError, match="dtype='int32'"):
        AttentionConfig(d_model=8, num_heads=2, window=2, max_len=4, dtype="int32")


def test_check_room_under_vmap_only_raises_for_a_full_cache():
    # vmap turns the guarding cond into a select, so the host check runs for every call
    @jax.jit
    @jax.vmap
    def advance(pos):
        check_room(pos, 5)
        return pos + 1

    np.testing.assert_array_equal(advance(jnp.array([0, 2, 4])), [1, 3, 5])
    with pytest.raises(Exception, match="position 7 >= max_len=5"):
        jax.block_until_ready(advance(jnp.array([1, 7, 3])))
