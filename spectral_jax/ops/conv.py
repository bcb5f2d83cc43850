"""Causal convolutions by FFT, and the direct ``O(L^2)`` reference the tests compare them with.

All FFT routines zero-pad to a fast length ``n >= 2L - 1`` so the circular convolution equals the
linear one on the first ``L`` outputs (nothing wraps around). FFTs run in float32 (or float64 when
the inputs are float64 under ``jax.enable_x64``); bf16 inputs are promoted, since XLA has no bf16
FFT, and the result is returned in the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fft_length(n: int) -> int:
    """Smallest 5-smooth integer (``2^a 3^b 5^c``) that is ``>= n``: sizes XLA's FFT is fast on."""
    if n < 1:
        raise ValueError(f"FFT length must be >= 1, got {n}")
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _fft_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _check_kernel_length(u: jax.Array, kernels: jax.Array) -> int:
    L = u.shape[-2]
    if kernels.shape[0] != L:
        raise ValueError(
            f"kernels have length {kernels.shape[0]} but the input has length {L}; "
            "slice the kernels to the input length first"
        )
    return L


def causal_conv(u: jax.Array, kernels: jax.Array) -> jax.Array:
    """Channel-wise causal convolution ``y[..., t, c] = sum_{s<=t} kernels[s, c] u[..., t-s, c]``.

    Args:
      u: ``[..., L, C]``.
      kernels: ``[L, C]`` (one kernel per channel).
    Returns:
      ``[..., L, C]`` in ``u``'s dtype.
    """
    L = _check_kernel_length(u, kernels)
    n = fft_length(2 * L - 1)
    dtype = _fft_dtype(u.dtype)
    u_hat = jnp.fft.rfft(u.astype(dtype), n=n, axis=-2)
    k_hat = jnp.fft.rfft(kernels.astype(dtype), n=n, axis=0)
    return jnp.fft.irfft(u_hat * k_hat, n=n, axis=-2)[..., :L, :].astype(u.dtype)


TRANSFER_BLOCK_BYTES = 64 << 20
"""Bytes of the transfer matrices (and their real product) that :func:`causal_conv_project`
forms at once: a block of frequencies at a time."""


def causal_conv_project(
    u: jax.Array, filters: jax.Array, weights: jax.Array, block_bytes: int = TRANSFER_BLOCK_BYTES
) -> jax.Array:
    """Convolve every input channel with every filter, then project:
    ``y[b, t, o] = sum_{f, d} (filters[:, f] * u[b, :, d])_t weights[f, d, o]``.

    The projection happens in the frequency domain: ``T[n, d, o] = sum_f F[n, f] W[f, d, o]``
    is formed per call (independent of the batch, as one real matrix product on the stacked
    real and imaginary parts), so only ``B * (D + O)`` FFTs are taken instead of ``B * F * D``
    for convolving before projecting; then ``y[n] = u[n] @ T[n]`` for each frequency ``n``.
    ``T`` is formed for a block of frequencies at a time (a ``lax.map`` over blocks of
    ``block_bytes``), so memory is ``O(B N (D + O))`` for the spectra plus the block, never
    ``N x D x O``; the sum itself is the same for every block size.

    Args:
      u: ``[B, L, D]``.
      filters: ``[L, F]``.
      weights: ``[F, D, O]``.
      block_bytes: bytes of the transfer block (at least one frequency is taken).
    Returns:
      ``[B, L, O]`` in ``u``'s dtype.
    """
    L = _check_kernel_length(u, filters)
    n = fft_length(2 * L - 1)
    dtype = _fft_dtype(u.dtype)
    F, D, O = weights.shape
    u_hat = jnp.fft.rfft(u.astype(dtype), n=n, axis=1).transpose(1, 0, 2)  # [N, B, D]
    f_hat = jnp.fft.rfft(filters.astype(dtype), n=n, axis=0)  # [N, F]
    weights = weights.astype(dtype).reshape(F, D * O)
    freqs = u_hat.shape[0]
    # per frequency: the stacked real product [2, D * O] and the complex transfer [D, O]
    per_freq = 4 * D * O * jnp.dtype(dtype).itemsize
    size = max(1, min(freqs, block_bytes // per_freq))
    count = -(-freqs // size)

    def project_block(blocks):
        u_b, f_b = blocks  # [size, B, D], [size, F]
        stacked = jnp.concatenate([f_b.real, f_b.imag], axis=0)  # [2 size, F]
        transfer = (stacked @ weights).reshape(2, size, D, O)
        return jnp.einsum("nbd,ndo->nbo", u_b, jax.lax.complex(transfer[0], transfer[1]))

    pad = count * size - freqs
    u_blocks = jnp.pad(u_hat, ((0, pad), (0, 0), (0, 0))).reshape(count, size, *u_hat.shape[1:])
    f_blocks = jnp.pad(f_hat, ((0, pad), (0, 0))).reshape(count, size, F)
    y_hat = jax.lax.map(project_block, (u_blocks, f_blocks)).reshape(count * size, -1, O)
    return jnp.fft.irfft(y_hat[:freqs], n=n, axis=0)[:L].transpose(1, 0, 2).astype(u.dtype)


def causal_conv_direct(u: jax.Array, kernels: jax.Array) -> jax.Array:
    """Reference for :func:`causal_conv` by an explicit ``O(L^2)`` sum (tests only).

    Args:
      u: ``[..., L, C]``.
      kernels: ``[L, C]``.
    Returns:
      ``[..., L, C]``.
    """
    L = _check_kernel_length(u, kernels)
    lag = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]  # t - s
    toeplitz = jnp.where(lag[..., None] >= 0, kernels[jnp.clip(lag, 0, L - 1)], 0)  # [L, L, C]
    return jnp.einsum("tsc,...sc->...tc", toeplitz, u)
