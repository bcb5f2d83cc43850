"""STU decoding: prefill + step-by-step (naive and FutureFill) equals the parallel forward pass,
for both variants and projections with AR terms; strategy selection; errors."""

import itertools

import jax
import jax.numpy as jnp
import pytest
from conftest import randomize_ar_output
from flax import nnx

from spectral_jax.nn.mixer import DecodeOptions
from spectral_jax.nn.stu import STU, STUCache, STUConfig
from spectral_jax.ops.conv_decode import FutureFillCache, NaiveCache

MODES = list(itertools.product(["standard", "hankel_l"], ["full", "tensordot"]))
TOL64 = 1e-12  # float64: FFT vs direct summation order only
# float32: the FFT path's relative error is a few eps32 * log2(FFT size 128) ~ 1e-6 and the
# direct sums' ~ eps32 * sqrt(L); the output AR recursion (|M_y| ~ 0.2) does not amplify it.
TOL32 = 1e-5


def make_layer(variant, projection, dtype, max_len=40):
    cfg = STUConfig(
        d_in=3, d_out=2, max_len=max_len, num_filters=5, variant=variant,
        projection=projection, k_u=2, k_y=2, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    return randomize_ar_output(STU(cfg, rngs=nnx.Rngs(0)), jax.random.key(1))


@nnx.jit(static_argnums=(2, 3))
def decode_all(layer, x, prompt_len, block_len=4):
    """Forward pass, and for each strategy: prefill ``prompt_len`` then scan the steps, and
    scan the steps from an empty cache. Returns (full, {name: [B, L', d_out]})."""
    outs = {}
    for strategy in ("naive", "futurefill"):
        options = DecodeOptions(strategy, block_len)
        y0, cache = layer.prefill(x[:, :prompt_len], options)
        _, ys = jax.lax.scan(layer.step, cache, x[:, prompt_len:].swapaxes(0, 1))
        outs[f"{strategy}_prefill"] = jnp.concatenate([y0, ys.swapaxes(0, 1)], axis=1)
        empty = layer.init_cache(x.shape[0], x.shape[1], x.dtype, options)
        _, ys = jax.lax.scan(layer.step, empty, x.swapaxes(0, 1))
        outs[f"{strategy}_empty"] = ys.swapaxes(0, 1)
    return layer(x), outs


@pytest.mark.parametrize(("variant", "projection"), MODES)
def test_prefill_and_steps_match_forward_float64(variant, projection):
    with jax.enable_x64(True):
        layer = make_layer(variant, projection, jnp.float64)
        x = jax.random.normal(jax.random.key(2), (2, 37, 3), jnp.float64)
        full, outs = decode_all(layer, x, 9)
        assert set(outs) == {
            "naive_prefill",
            "naive_empty",
            "futurefill_prefill",
            "futurefill_empty",
        }
        for name, got in outs.items():
            assert got.dtype == jnp.float64, name
            err = float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full))
            assert err <= TOL64, (name, err)


@pytest.mark.parametrize("projection", ["full", "tensordot"])
def test_prefill_and_steps_match_forward_float32_default_blocks(projection):
    layer = make_layer("standard", projection, jnp.float32, max_len=64)
    x = jax.random.normal(jax.random.key(3), (2, 64, 3), jnp.float32)
    full, outs = decode_all(layer, x, 20, None)
    for name, got in outs.items():
        assert got.dtype == jnp.float32, name
        err = float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full))
        assert err <= TOL32, (name, err)


def test_strategy_is_chosen_where_the_cache_is_built():
    layer = make_layer("standard", "tensordot", jnp.float32)
    x = jnp.ones((1, 5, 3))

    def cache_of(*options):  # the cache's structure, traced only (nothing runs)
        return jax.eval_shape(lambda x: layer.prefill(x, *options)[1], x)

    assert isinstance(cache_of().conv, FutureFillCache)  # DecodeOptions() default
    assert isinstance(cache_of(DecodeOptions("naive")).conv, NaiveCache)
    cache = layer.init_cache(1, 16, jnp.float32, DecodeOptions("naive", 8))
    assert isinstance(cache, STUCache) and cache.conv.history.shape == (16, 1, 2)
    assert cache.inputs.shape == (1, 1, 3) and cache.outputs.shape == (1, 2, 2)
    assert layer.length_limit == 40  # the filters end at max_len
    assert not hasattr(layer.config, "decode_strategy")  # not a config field any more


def test_bad_decode_inputs_raise():
    layer = make_layer("standard", "full", jnp.float32, max_len=8)
    x = jnp.ones((2, 8, 3))
    naive = DecodeOptions("naive", 2)
    _, cache = layer.prefill(x, naive)
    with pytest.raises(ValueError, match="cache is full: position 8 >= max_len=8"):
        layer.step(cache, x[:, 0])
    _, cache = layer.prefill(x[:, :3], naive)
    with pytest.raises(ValueError, match=r"x_t must be \[2, 3\]"):
        layer.step(cache, jnp.ones((3, 3)))  # batch mismatch
    with pytest.raises(ValueError, match="dtype bfloat16 does not match cache float32"):
        layer.step(cache, jnp.ones((2, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="cache must be an STUCache"):
        layer.step(cache.conv, x[:, 0])
    with pytest.raises(ValueError, match=r"input length 9 is outside \[1, max_len=8\]"):
        layer.prefill(jnp.ones((2, 9, 3)))  # prompt longer than max_len
    with pytest.raises(ValueError, match=r"max_len=9 must be in \[1, config.max_len=8\]"):
        layer.init_cache(2, 9, jnp.float32)
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        layer.init_cache(2, 8, jnp.int32)
    with pytest.raises(ValueError, match="block_len=3 must be in"):
        layer.init_cache(2, 2, jnp.float32, DecodeOptions("futurefill", 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "lds"}, "DecodeOptions.strategy must be one of"),
        ({"block_len": 0}, "DecodeOptions.block_len must be an integer >= 1"),
    ],
)
def test_bad_decode_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeOptions(**kwargs)
