"""Sliding-window attention: pure functions vs a naive loop, decode path vs parallel path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.nn.attention import AttentionConfig, SlidingWindowAttention
from spectral_jax.ops.attention import rope, sliding_window_attention

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
    config = AttentionConfig(d_model=16, num_heads=2, window=6, dtype=jnp.float64)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, 20, 16))
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        full = forward(layer, x)
        got = decode(layer, x, prompt_len)
    assert full.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=TOL64)


def test_jitted_steps_from_empty_cache_match_call_float32():
    """No length limit: the ring buffer has ``window`` slots however long the sequence."""
    config = AttentionConfig(d_model=16, num_heads=4, window=5)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(1))
    assert layer.length_limit is None
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 24, 16)), jnp.float32)
    graphdef, state = nnx.split(layer)

    @jax.jit  # the functional style a decode loop uses: params as an explicit pytree
    def step_fn(state, cache, x_t):
        return nnx.merge(graphdef, state).step(cache, x_t)

    cache = layer.init_cache(3, 12, jnp.float32)
    assert cache.k.shape == (3, 5, 4, 4)  # ring buffer: window slots, not max_len
    outs = []
    for t in range(24):  # past the max_len given to init_cache: it only sizes nothing here
        cache, y_t = step_fn(state, cache, x[:, t])
        outs.append(y_t)
    np.testing.assert_allclose(np.stack(outs, 1), forward(layer, x), atol=TOL32, rtol=TOL32)


def test_bfloat16_activations_keep_float32_params():
    config = AttentionConfig(d_model=16, num_heads=2, window=4)
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


@pytest.mark.parametrize("length", [7, 20])  # dense path, and blocks of `window` queries
def test_left_padded_rows_match_each_row_alone_float64(length):
    """pad keys are masked and rotary positions start at each row's first real token, so a
    left-padded row gives what the row alone gives, in prefill and in the steps after it."""
    config = AttentionConfig(d_model=8, num_heads=2, window=3, dtype=jnp.float64)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(5))
    pads = [0, 2, 5]
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        rows = [jnp.asarray(rng.standard_normal((1, length - p + 4, 8))) for p in pads]
        # pad positions hold junk: the block zeroes them, but attention must not read them
        padded = [
            jnp.pad(r, ((0, 0), (p, 0), (0, 0)), constant_values=7.0)
            for r, p in zip(rows, pads, strict=True)
        ]
        batch = jnp.concatenate(padded)
        y, cache = layer.prefill(batch[:, :length], pad=jnp.asarray(pads))
        steps = []
        for t in range(length, length + 4):
            cache, y_t = layer.step(cache, batch[:, t])
            steps.append(y_t)
        for i, (row, p) in enumerate(zip(rows, pads, strict=True)):
            alone = forward(layer, row)
            got = jnp.concatenate([y[i : i + 1, p:], jnp.stack(steps, 1)[i : i + 1]], axis=1)
            np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=TOL64)


def test_bad_inputs_raise():
    config = AttentionConfig(d_model=8, num_heads=2, window=3)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 8))
    _, cache = prefill(layer, x[:, :2])
    with pytest.raises(ValueError, match="x_t must be"):
        layer.step(cache, jnp.ones((3, 8)))  # batch mismatch
    with pytest.raises(ValueError, match="dtype"):
        layer.step(cache, jnp.ones((2, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"x must be \[B, L >= 1, 8\]"):
        layer(jnp.ones((2, 0, 8)))
    with pytest.raises(ValueError, match=r"x must be \[B, L >= 1, 8\]"):
        layer(jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match=r"max_len must be an integer >= 1, got 0"):
        layer.init_cache(2, 0, jnp.float32)
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=8"):
        AttentionConfig(d_model=8, num_heads=3, window=2)
    with pytest.raises(ValueError, match="must be even"):
        AttentionConfig(d_model=6, num_heads=2, window=2)
    with pytest.raises(ValueError, match=r"window must be an integer >= 1, got 0"):
        AttentionConfig(d_model=8, num_heads=2, window=0)
    with pytest.raises(ValueError, match=r"dtype must be one of .* got 'int32'"):
        AttentionConfig(d_model=8, num_heads=2, window=2, dtype="int32")


def test_prefill_in_chunks_continues_from_the_ring_buffer_float64():
    """Chunks of a ragged batch, each continuing from the cache of the ones before (shorter
    than the window, dense, blocked with the ring buffer as prefix, a single position), give
    the one-pass prefill's outputs and cache; a step after them agrees too."""
    config = AttentionConfig(d_model=8, num_heads=2, window=4, dtype=jnp.float64)
    layer = SlidingWindowAttention(config, rngs=nnx.Rngs(7))
    pads = jnp.asarray([0, 6])  # row 1's padding runs past the first chunk
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 22, 8)))
        whole, whole_cache = layer.prefill(x[:, :21], pad=pads)
        cache, outs, start = layer.init_cache(2, 1, jnp.float64), [], 0
        for size in (3, 7, 10, 1):  # 3 < W, 7 <= 2W dense, 10 > 2W blocked, then one
            y, cache = layer.prefill(x[:, start : start + size], pad=pads - start, cache=cache)
            outs.append(y)
            start += size
        for name in ("k", "v", "pos", "pad"):
            np.testing.assert_allclose(getattr(cache, name), getattr(whole_cache, name), atol=TOL64)
        real = np.arange(21)[None, :, None] >= np.asarray(pads)[:, None, None]
        got = jnp.concatenate(outs, axis=1)
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, whole, 0), atol=TOL64)
        _, y_next = layer.step(cache, x[:, 21])
        _, y_whole = layer.step(whole_cache, x[:, 21])
        np.testing.assert_allclose(y_next, y_whole, atol=TOL64)
    with pytest.raises(ValueError, match="cache holds 2 rows"):
        layer.prefill(jnp.ones((3, 2, 8)), cache=cache)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_blocks_in_groups_equal_one_product(with_prefix):
    """A budget of one block's scores processes the blocks one group at a time (lax.map);
    every block computes the same products as in one product over all blocks."""
    rng = np.random.default_rng(9)
    b, length, h, dh, w = 2, 29, 2, 4, 3
    q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, dh)), jnp.float32) for _ in range(3))
    pad = jnp.asarray([0, 4])
    prefix, start = None, 0
    if with_prefix:
        prefix = tuple(jnp.asarray(rng.standard_normal((b, w, h, dh)), jnp.float32) for _ in "kv")
        start = jnp.int32(5)
    one_block = b * h * w * 2 * w * 4  # bytes of one block's float32 logits
    grouped = [
        sliding_window_attention(q, k, v, w, pad, prefix, start, score_budget=budget)
        for budget in (one_block, 3 * one_block, 10**9)  # groups of 1, 3 and all 10 blocks
    ]
    # The same operations per block (bitwise equal on CPU); the budget allows XLA another
    # order for the dh-wide logits and 2W-wide softmax sums: (dh + 2W) float32 roundings of
    # outputs that are weighted means of N(0, 1) values drawn here (|v| < 4).
    budget = (dh + 2 * w) * 2.0**-24 * 4
    for got in grouped[:2]:
        np.testing.assert_allclose(got, grouped[2], atol=budget, rtol=0)
