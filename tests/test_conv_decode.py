"""Naive and FutureFill decode caches against the direct convolution sum (float64 steps and
prefill; float32 ``extend`` in pieces mixed with steps), block boundaries and FFT size buckets
included, and their errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.ops import conv_decode
from spectral_jax.ops.conv import causal_conv_direct
from spectral_jax.ops.projection import PROJECTIONS_BY_NAME

FULL, TENSORDOT = PROJECTIONS_BY_NAME["full"], PROJECTIONS_BY_NAME["tensordot"]

TOL64 = 1e-13  # float64 sums of <= 40 O(1) terms, FFT of length <= 128: a few hundred ulps


def contraction(weights):
    """The projection object and params of a projected (``weights [F, C, O]``) or channelwise
    (None) contraction."""
    return (TENSORDOT, {}) if weights is None else (FULL, {"M_plus": weights})


def reference(h, kernels, weights):
    """Direct O(L^2) sum; h: [B, L, C], kernels: [L, F], weights: [F, C, O] or None."""
    length = h.shape[1]
    if weights is None:
        return causal_conv_direct(h, kernels[:length])
    per_filter = jnp.stack(
        [causal_conv_direct(h, jnp.tile(kernels[:length, f : f + 1], (1, h.shape[2])))
         for f in range(kernels.shape[1])], axis=2,
    )  # fmt: skip  # [B, L, F, C]
    return jnp.einsum("blfc,fco->blo", per_filter, weights)


@functools.partial(jax.jit, static_argnums=3)
def run_both(h, kernels, weights, prompt_len):
    """Decode h: [B, L, C] with each strategy (block 3 and 5): from an empty cache, and after
    prefilling the first ``prompt_len`` positions. Returns four [B, L, O] arrays."""
    outs = []
    projection, params = contraction(weights)
    for strategy, block_len in (("naive", 3), ("futurefill", 5)):
        B, L, C = h.shape
        empty = conv_decode.init_cache(
            strategy, projection, kernels, params, B, L, C, h.dtype, block_len
        )

        def advance(cache, h_t):
            return conv_decode.step(cache, h_t, params)

        _, ys = jax.lax.scan(advance, empty, jnp.swapaxes(h, 0, 1))
        outs.append(jnp.swapaxes(ys, 0, 1))
        cache = conv_decode.prefill(empty, h[:, :prompt_len], params)
        _, ys = jax.lax.scan(advance, cache, jnp.swapaxes(h[:, prompt_len:], 0, 1))
        outs.append(jnp.swapaxes(ys, 0, 1))
    return outs


@jax.jit
def scan_steps(cache, h):
    """Channelwise steps over h: [B, L, C] -> (cache, [B, L, C])."""
    cache, ys = jax.lax.scan(lambda c, h_t: conv_decode.step(c, h_t, {}), cache, h.swapaxes(0, 1))
    return cache, ys.swapaxes(0, 1)


@pytest.mark.parametrize("projected", [False, True])
def test_strategies_match_direct_sum_float64(projected):
    rng = np.random.default_rng(int(projected))
    B, L, C, F, O = 2, 23, 3, 4, 2  # L is neither a multiple of 3 nor of 5
    with jax.enable_x64(True):
        h = jnp.asarray(rng.standard_normal((B, L, C)))
        if projected:
            kernels = jnp.asarray(rng.standard_normal((L + 4, F)))  # longer than max_len
            weights = jnp.asarray(rng.standard_normal((F, C, O)))
        else:
            kernels, weights = jnp.asarray(rng.standard_normal((L, C))), None
        ref = np.asarray(reference(h, kernels, weights))
        naive, naive_tail, ff, ff_tail = (np.asarray(y) for y in run_both(h, kernels, weights, 7))
    scale = np.max(np.abs(ref))
    for got in (naive, ff):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, ref, atol=TOL64 * scale, rtol=0)
    for got in (naive_tail, ff_tail):
        np.testing.assert_allclose(got, ref[:, 7:], atol=TOL64 * scale, rtol=0)


# chunks of conv inputs, 23 in all: extended from 0, extended again, stepped (across a FutureFill
# epoch's end at block 5), then extended from mid-epoch
SCHEDULE = ((4, "extend"), (7, "extend"), (3, "step"), (9, "extend"))


@functools.partial(jax.jit, static_argnums=3)
def extend_and_step(h, kernels, weights, strategy):
    """Decode h: [B, 23, C] by :data:`SCHEDULE` (block 3 naive, 5 FutureFill) and by steps
    alone. Returns two [B, 23, O] arrays."""
    projection, params = contraction(weights)
    B, L, C = h.shape
    block_len = {"naive": 3, "futurefill": 5}[strategy]
    empty = conv_decode.init_cache(
        strategy, projection, kernels, params, B, L, C, h.dtype, block_len
    )
    cache, pos, pieces = empty, 0, []
    for count, how in SCHEDULE:
        advance = conv_decode.extend if how == "extend" else scan_with
        cache, y = advance(cache, h[:, pos : pos + count], params)
        pieces.append(y)
        pos += count
    assert pos == L
    return jnp.concatenate(pieces, axis=1), scan_with(empty, h, params)[1]


def scan_with(cache, h, params):
    """Steps over h: [B, T, C] -> (cache, [B, T, O])."""
    step = lambda c, h_t: conv_decode.step(c, h_t, params)  # noqa: E731
    cache, ys = jax.lax.scan(step, cache, h.swapaxes(0, 1))
    return cache, ys.swapaxes(0, 1)


@pytest.mark.parametrize("projected", [False, True])
def test_extend_in_pieces_matches_steps_and_direct_sum_float32(projected):
    rng = np.random.default_rng(10 + int(projected))
    B, L, C, F, O = 2, 23, 3, 4, 2
    h = rng.standard_normal((B, L, C)).astype(np.float32)
    kernels = rng.standard_normal((L, F if projected else C)).astype(np.float32)
    weights = rng.standard_normal((F, C, O)).astype(np.float32) if projected else None
    with jax.enable_x64(True):  # float64 reference, and the sum of |terms| of every output
        ref = np.asarray(reference(*(jnp.asarray(a, jnp.float64) if a is not None else None
                                     for a in (h, kernels, weights))))  # fmt: skip
        bound = np.asarray(reference(*(jnp.asarray(np.abs(a), jnp.float64) if a is not None
                                       else None for a in (h, kernels, weights))))  # fmt: skip
    # Rounding budget: an output sums at most L products per filter and channel in float32, so
    # recursive summation errs by at most L * eps32 * (its sum of |terms|); the FFTs (length
    # <= 64 here) err by ~log2(n) eps32 times the l2 norms, below that.
    atol = L * np.finfo(np.float32).eps * np.max(bound)
    for strategy in ("naive", "futurefill"):
        pieces, steps = (np.asarray(y) for y in extend_and_step(h, kernels, weights, strategy))
        for got in (pieces, steps):
            assert got.dtype == np.float32 and got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


def test_epoch_length_one_and_max_len_float32():
    """E = 1 refreshes by FFT every token; E = max_len never after prefill. float32 error of
    sums of <= 16 O(1) terms stays within ~1e-5 of their scale."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((1, 16, 2)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    ref = np.asarray(reference(h, kernels, None))
    for block_len in (1, 16):
        cache = conv_decode.init_cache(
            "futurefill", TENSORDOT, kernels, {}, 1, 16, 2, jnp.float32, block_len
        )
        cache, ys = scan_steps(cache, h)
        got = np.asarray(ys)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.max(np.abs(ref)), rtol=0)
    assert int(cache.pos) == 16


def test_default_block_lengths():
    assert conv_decode.default_block_len("naive", 10) == 10
    assert conv_decode.default_block_len("naive", 1 << 20) == conv_decode.NAIVE_BLOCK
    # 2 sqrt(2^16 * 16) = 2048 and 2 sqrt(2^20 * 20) ~ 9160 -> 8192; never above max_len
    assert conv_decode.default_block_len("futurefill", 1 << 16) == 2048
    assert conv_decode.default_block_len("futurefill", 1 << 20) == 8192
    assert conv_decode.default_block_len("futurefill", 4) == 4


def test_errors():
    kernels = jnp.ones((8, 2))
    cache = conv_decode.init_cache("naive", TENSORDOT, kernels, {}, 2, 4, 2, jnp.float32)
    with pytest.raises(ValueError, match=r"input must be \[2, 2\]"):
        conv_decode.step(cache, jnp.ones((3, 2)), {})
    with pytest.raises(ValueError, match="dtype bfloat16 does not match"):
        conv_decode.step(cache, jnp.ones((2, 2), jnp.bfloat16), {})
    with pytest.raises(ValueError, match="extend: 5 tokens from position 0 pass max_len=4"):
        conv_decode.prefill(cache, jnp.ones((2, 5, 2)), {})
    with pytest.raises(ValueError, match=r"input must be \[2, T >= 1, 2\], got \(2, 0, 2\)"):
        conv_decode.extend(cache, jnp.ones((2, 0, 2)), {})
    part = cache.replace(pos=jnp.asarray(2, jnp.int32))
    with pytest.raises(ValueError, match="3 tokens from position 2 pass max_len=4"):
        conv_decode.extend(part, jnp.ones((2, 3, 2)), {})
    with pytest.raises(Exception, match="3 tokens from position 2 pass"):  # runtime under jit
        jax.block_until_ready(jax.jit(lambda pos: conv_decode.check_room(pos, 4, 3))(2))
    full = conv_decode.prefill(cache, jnp.ones((2, 4, 2)), {})
    with pytest.raises(ValueError, match="cache is full: position 4 >= max_len=4"):
        conv_decode.step(full, jnp.ones((2, 2)), {})
    with pytest.raises(Exception, match="cache is full"):  # runtime error under jit
        jax.block_until_ready(jax.jit(conv_decode.step)(full, jnp.ones((2, 2)), {}))
    td, projected = (TENSORDOT, kernels, {}), (FULL, kernels, {"M_plus": jnp.ones((2, 3, 1))})
    bad_calls = [
        (("lds", *td, 2, 4, 2, jnp.float32), "strategy must be one of"),
        (("naive", *td, 2, 9, 2, jnp.float32), "L >= max_len=9"),
        (("naive", *td, 0, 4, 2, jnp.float32), "batch must be an integer >= 1, got 0"),
        (("naive", *td, 2, 4, 3, jnp.float32), "one tap per channel"),
        (("naive", *projected, 2, 4, 2, jnp.float32), r"weights must be \[F=2"),
        (("futurefill", *td, 2, 4, 2, jnp.float32, 5), "block_len=5 must be in"),
    ]
    for args, match in bad_calls:
        with pytest.raises(ValueError, match=match):
            conv_decode.init_cache(*args)


def test_check_room_under_vmap_only_raises_for_a_full_cache():
    # vmap turns the guarding cond into a select, so the host check runs for every call
    @jax.jit
    @jax.vmap
    def advance(pos):
        conv_decode.check_room(pos, 5)
        return pos + 1

    np.testing.assert_array_equal(advance(jnp.array([0, 2, 4])), [1, 3, 5])
    with pytest.raises(Exception, match="position 7 >= max_len=5"):
        jax.block_until_ready(advance(jnp.array([1, 7, 3])))
