"""RMSNorm, the gated MLP (SwiGLU, GeGLU), the residual block (attention as its mixer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.nn.attention import AttentionConfig, KVCache, SlidingWindowAttention
from spectral_jax.nn.blocks import BlockConfig, ResidualBlock, gated_mlp, rms_norm

TOL64 = 1e-12  # float64 reorderings of O(1) sums: a few ulps


def test_rms_norm_and_gated_mlps_match_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8))
    scale = rng.standard_normal(8)
    wg, wu = rng.standard_normal((8, 5)), rng.standard_normal((8, 5))
    wd = rng.standard_normal((5, 8))
    bg, bu, bd = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(8)
    ref_norm = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
    g = x @ wg
    ref_swiglu = (g / (1 + np.exp(-g)) * (x @ wu)) @ wd
    gb = g + bg  # GeGLU with biases, the tanh form of GELU
    gelu = 0.5 * gb * (1 + np.tanh(np.sqrt(2 / np.pi) * (gb + 0.044715 * gb**3)))
    ref_geglu = (gelu * (x @ wu + bu)) @ wd + bd
    with jax.enable_x64(True):
        got_norm = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6))
        weights = tuple(map(jnp.asarray, (wg, wu, wd)))
        got_swiglu = np.asarray(gated_mlp(jnp.asarray(x), *weights))
        biases = tuple(map(jnp.asarray, (bg, bu, bd)))
        got_geglu = np.asarray(gated_mlp(jnp.asarray(x), *weights, "geglu", biases))
    np.testing.assert_allclose(got_norm, ref_norm, atol=TOL64)
    for got, ref in ((got_swiglu, ref_swiglu), (got_geglu, ref_geglu)):
        np.testing.assert_allclose(got, ref, atol=TOL64 * np.abs(ref).max())


def test_rms_norm_keeps_bfloat16():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16)), jnp.bfloat16)
    y = rms_norm(x, jnp.ones(16), 1e-6)
    assert y.dtype == jnp.bfloat16
    rms = jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2, -1))
    np.testing.assert_allclose(rms, 1.0, atol=2.0**-7)  # bf16 rounding of each entry


def make_block(dtype=jnp.float32):
    attn = SlidingWindowAttention(
        AttentionConfig(d_model=16, num_heads=2, window=5, dtype=dtype),
        rngs=nnx.Rngs(0),
    )
    return ResidualBlock(attn, BlockConfig(d_model=16, d_hidden=24), rngs=nnx.Rngs(1))


def test_block_prefill_then_step_matches_call_float64():
    block = make_block(jnp.float64)
    # give the norm scales non-trivial values so a misplaced norm would show up
    block.mixer_norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    block.mlp_norm.scale[...] = jnp.linspace(1.5, 0.5, 16)
    x = np.random.default_rng(2).standard_normal((2, 14, 16))
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        full = nnx.jit(lambda m, x: m(x))(block, x)
        y, cache = nnx.jit(lambda m, x: m.prefill(x))(block, x[:, :8])
        outs = [y]
        step = nnx.jit(lambda m, cache, x_t: m.step(cache, x_t))
        for t in range(8, 14):
            cache, y_t = step(block, cache, x[:, t])
            outs.append(y_t[:, None])
        got = jnp.concatenate(outs, 1)
        change = float(jnp.max(jnp.abs(full - x)))
    assert isinstance(cache, KVCache)  # the block's cache is the mixer's cache
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=TOL64)
    # the block changes its input through both branches
    assert change > 0.1


def test_block_init_cache_is_mixer_cache_and_params_are_counted():
    block = make_block()
    assert block.length_limit is None  # the mixer's
    cache = block.init_cache(3, 10, jnp.float32)
    ref = block.mixer.init_cache(3, 10, jnp.float32)
    assert jax.tree.structure(cache) == jax.tree.structure(ref)
    sizes = [p.size for p in jax.tree.leaves(nnx.state(block, nnx.Param))]
    # 2 norms (16 each) + qkv (16*48) + out (16*16) + SwiGLU (3 * 16*24)
    assert sum(sizes) == 2 * 16 + 16 * 48 + 16 * 16 + 3 * 16 * 24


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"BlockConfig\.d_hidden must be an integer >= 1, got 0"):
        BlockConfig(d_model=8, d_hidden=0)
    with pytest.raises(ValueError, match=r"norm_eps=0\.0"):
        BlockConfig(d_model=8, d_hidden=8, norm_eps=0.0)
    with pytest.raises(ValueError, match="does not match scale"):
        rms_norm(jnp.ones((2, 7)), jnp.ones(8), 1e-6)
