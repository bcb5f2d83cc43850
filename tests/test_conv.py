"""FFT causal convolution against the direct O(L^2) sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.ops import conv


def test_fft_length_is_smallest_5_smooth_at_least_n():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in [1, 2, 7, 127, 1000, 8191, 9999, 2**20 + 1]:
        size = conv.fft_length(n)
        assert size >= n and smooth(size)
        assert not any(smooth(m) for m in range(n, size))


@pytest.mark.parametrize("L", [1, 2, 37, 256])
def test_causal_conv_matches_direct_float64(L):
    with jax.enable_x64(True):
        ku, kk = jax.random.split(jax.random.key(L))
        u = jax.random.normal(ku, (2, L, 3), jnp.float64)
        k = jax.random.normal(kk, (L, 3), jnp.float64)
        fast, ref = conv.causal_conv(u, k), conv.causal_conv_direct(u, k)
        assert fast.dtype == jnp.float64
        assert jnp.linalg.norm(fast - ref) <= 1e-10 * jnp.linalg.norm(ref)


def test_causal_conv_float32_and_bfloat16():
    L = 512
    u = np.random.default_rng(0).standard_normal((2, L, 4))
    k = np.random.default_rng(1).standard_normal((L, 4)) / np.sqrt(L)
    with jax.enable_x64(True):
        ref = np.asarray(conv.causal_conv_direct(jnp.asarray(u), jnp.asarray(k)))
    y32 = conv.causal_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
    # float32 FFT round-off grows like eps32 * log2(n): ~1e-6 relative for n = 1024.
    assert y32.dtype == jnp.float32
    assert np.linalg.norm(np.asarray(y32, np.float64) - ref) <= 1e-5 * np.linalg.norm(ref)
    y16 = conv.causal_conv(jnp.asarray(u, jnp.bfloat16), jnp.asarray(k, jnp.float32))
    # bf16 keeps 8 bits: input and output rounding dominate (2^-8 ~ 4e-3 each).
    assert y16.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(y16, np.float64) - ref) <= 1e-2 * np.linalg.norm(ref)


def test_causal_conv_is_causal():
    u = jnp.zeros((1, 64, 1)).at[0, 40, 0].set(1.0)
    k = jnp.ones((64, 1))
    y = conv.causal_conv(u, k)
    assert jnp.all(jnp.abs(y[0, :40, 0]) < 1e-6)
    assert jnp.allclose(y[0, 40:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("block_freqs", [None, 1, 7])
def test_causal_conv_project_matches_direct_float64(block_freqs):
    """Transfer blocks of every frequency (the default), of one, and of 7 (the 51 frequencies
    of n = fft_length(99) = 100 do not split evenly)."""
    B, L, D, F, O = 2, 50, 3, 4, 5
    per_freq = 4 * D * O * 8  # float64 numbers of the transfer block per frequency
    block_bytes = conv.TRANSFER_BLOCK_BYTES if block_freqs is None else per_freq * block_freqs
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        u = jax.random.normal(keys[0], (B, L, D), jnp.float64)
        filt = jax.random.normal(keys[1], (L, F), jnp.float64)
        w = jax.random.normal(keys[2], (F, D, O), jnp.float64)
        per_filter = jnp.stack(
            [conv.causal_conv_direct(u, jnp.tile(filt[:, f : f + 1], (1, D))) for f in range(F)]
        )  # [F, B, L, D]
        ref = jnp.einsum("fbld,fdo->blo", per_filter, w)
        fast = conv.causal_conv_project(u, filt, w, block_bytes)
        assert jnp.linalg.norm(fast - ref) <= 1e-10 * jnp.linalg.norm(ref)


def test_kernel_length_mismatch_raises():
    with pytest.raises(ValueError, match="kernels have length 8 but the input has length 9"):
        conv.causal_conv(jnp.ones((1, 9, 2)), jnp.ones((8, 2)))
    with pytest.raises(ValueError, match="FFT length must be >= 1"):
        conv.fft_length(0)
