"""Token-by-token decoding of causal convolutions: the naive and the FutureFill caches.

A convolutional layer maps its conv inputs ``h_s: [C]`` to ``y_t = sum_{s<=t} K[t-s] . h_s``,
with taps ``K[l]`` at lag ``l``, contracted one of two ways:

* channelwise (tensordot STU): taps ``[L, C]``, ``y_t[c] = sum_s K[t-s, c] h_s[c]``;
* projected (full STU): taps ``[L, F]`` and weights ``W: [F, C, O]``,
  ``y_t[o] = sum_{s, f, c} K[t-s, f] h_s[c] W[f, c, o]``.

Strategies (both exact: they only reorder the sum):

* **naive**: keep every past input in a history preallocated to ``max_len`` and evaluate the
  sum at the new position, reading the history in blocks of ``block_len`` up to position ``t``
  only: ``O(t)`` work per token.
* **futurefill** (epoched FutureFill, Agarwal et al. 2024): positions come in epochs of ``E``
  tokens. When an epoch starts at ``t0``, one FFT convolution of the history computes
  ``F[j] = sum_{s<t0} K[t0+j-s] . h_s`` for ``j < E``, the contribution of the whole past to the
  epoch's ``E`` positions; inside the epoch ``y_t = F[t-t0] + sum_{t0<=s<=t} K[t-s] . h_s``, an
  ``O(E)`` sum. The FFT covers the smallest length ``E * 2^j >= t0 + E``, so an epoch costs
  ``O(t0 log t0)`` whatever ``max_len``; ``N`` tokens cost ``O(N E + N^2 log N / E)``.

Taps are stored once per cache with ``P`` leading zeros (lag ``l`` at row ``P + l``) so the
taps of any window of positions are one ``dynamic_slice``. Everything is a pure function of
explicit pytrees; only the shapes are static, so a decode loop runs in ``lax.scan`` without
Python work per token.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spectral_jax.conv import causal_conv, causal_conv_project

STRATEGIES = ("naive", "futurefill")
NAIVE_BLOCK = 512  # history positions read per loop iteration by the naive strategy


@struct.dataclass
class NaiveCache:
    """Decode state of the naive strategy.

    history: ``[B, T, C]`` conv inputs at positions ``< pos``, zeros after
      (``T = max_len`` rounded up to a multiple of ``block_len``).
    taps: ``[block_len + T, F]`` kernel taps, lag ``l`` at row ``block_len + l``.
    pos: int32 scalar, the position of the next token. max_len: static limit on ``pos``.
    """

    history: jax.Array
    taps: jax.Array
    pos: jax.Array
    max_len: int = struct.field(pytree_node=False)
    block_len: int = struct.field(pytree_node=False)


@struct.dataclass
class FutureFillCache:
    """Decode state of the epoched FutureFill strategy.

    history: ``[B, T, C]`` conv inputs at positions ``< pos``, zeros after (``T = max_len + E``).
    taps: ``[E + T, F]`` kernel taps, lag ``l`` at row ``E + l``.
    block: ``[B, E, O]`` contribution of the inputs before ``epoch_start`` to positions
      ``epoch_start .. epoch_start + E - 1`` (compute dtype, projected).
    epoch_start, pos: int32 scalars. max_len: static limit on ``pos``; block_len: ``E``.
    """

    history: jax.Array
    taps: jax.Array
    block: jax.Array
    epoch_start: jax.Array
    pos: jax.Array
    max_len: int = struct.field(pytree_node=False)
    block_len: int = struct.field(pytree_node=False)


ConvCache = NaiveCache | FutureFillCache


def default_block_len(strategy: str, max_len: int) -> int:
    """Naive: ``min(NAIVE_BLOCK, max_len)``. FutureFill: the power of two nearest
    ``sqrt(max_len * log2(max_len))``, which balances the ``N E`` in-epoch work against the
    ``N^2 log N / E`` FFT work."""
    if strategy == "naive":
        return min(NAIVE_BLOCK, max_len)
    balance = math.sqrt(max_len * max(math.log2(max_len), 1.0))
    return min(1 << round(math.log2(balance)), max_len)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Sums run in float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _raise_if_full(pos: Any, max_len: int) -> None:
    full = np.asarray(pos) >= max_len
    if np.any(full):
        first = int(np.asarray(pos)[full].flat[0])
        raise ValueError(f"step: cache is full: position {first} >= max_len={max_len}")


def check_room(pos: jax.Array, max_len: int) -> None:
    """Raise ValueError if a cache at ``pos`` cannot take one more token: now for a concrete
    ``pos``, as a runtime error from a host callback for a traced one (under jit / scan). The
    callback re-tests the position so it stays correct when vmap turns the cond into a select."""
    if isinstance(pos, jax.core.Tracer):
        jax.lax.cond(
            pos >= max_len,
            lambda p: jax.debug.callback(_raise_if_full, p, max_len),
            lambda p: None,
            pos,
        )
    else:
        _raise_if_full(pos, max_len)


def _padded_taps(kernels: jax.Array, pad: int, length: int, dtype: Any) -> jax.Array:
    """``kernels: [L, F] -> [pad + length, F]``: ``pad`` zero rows, then lags ``0..length-1``
    (zeros past ``L``)."""
    kernels = kernels[:length].astype(dtype)
    return jnp.pad(kernels, ((pad, length - kernels.shape[0]), (0, 0)))


def _check_init(kernels, weights, batch, max_len, channels, block_len) -> None:
    for name, value in (("batch", batch), ("max_len", max_len), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if kernels.ndim != 2 or kernels.shape[0] < max_len:
        raise ValueError(
            f"kernels must be [L, F] with L >= max_len={max_len}, got shape {kernels.shape}"
        )
    if weights is None and kernels.shape[1] != channels:
        raise ValueError(
            f"channelwise kernels need one tap per channel: {kernels.shape[1]} != {channels}"
        )
    if weights is not None and weights.shape[:2] != (kernels.shape[1], channels):
        raise ValueError(
            f"weights must be [F={kernels.shape[1]}, C={channels}, O], got {weights.shape}"
        )
    if isinstance(block_len, bool) or not isinstance(block_len, int):
        raise ValueError(f"block_len must be an int, got {block_len!r}")
    if not 1 <= block_len <= max_len:
        raise ValueError(f"block_len={block_len} must be in [1, max_len={max_len}]")


def init_cache(
    strategy: str,
    kernels: jax.Array,
    weights: jax.Array | None,
    batch: int,
    max_len: int,
    channels: int,
    dtype: Any,
    block_len: int | None = None,
) -> ConvCache:
    """Empty cache (position 0) for ``batch`` sequences of at most ``max_len`` tokens.

    Args:
      strategy: ``"naive"`` or ``"futurefill"``.
      kernels: taps ``[L, F]`` with ``L >= max_len`` (only lags ``< max_len`` are kept).
      weights: ``[F, C, O]`` for the projected contraction, None for channelwise.
      channels: ``C``; dtype: dtype of the stored history (and of the inputs to ``step``).
      block_len: naive read block / FutureFill epoch length (default :func:`default_block_len`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if block_len is None:
        block_len = default_block_len(strategy, max_len)
    _check_init(kernels, weights, batch, max_len, channels, block_len)
    cdt = compute_dtype(dtype)
    pos = jnp.zeros((), jnp.int32)
    if strategy == "naive":
        length = -(-max_len // block_len) * block_len
        return NaiveCache(
            history=jnp.zeros((batch, length, channels), dtype),
            taps=_padded_taps(kernels, block_len, length, cdt),
            pos=pos,
            max_len=max_len,
            block_len=block_len,
        )
    length = max_len + block_len
    out = channels if weights is None else weights.shape[2]
    return FutureFillCache(
        history=jnp.zeros((batch, length, channels), dtype),
        taps=_padded_taps(kernels, block_len, length, cdt),
        block=jnp.zeros((batch, block_len, out), cdt),
        epoch_start=pos,
        pos=pos,
        max_len=max_len,
        block_len=block_len,
    )


def _window_sum(cache: ConvCache, start: jax.Array, t: jax.Array, projected: bool) -> jax.Array:
    """``sum_{start<=s<start+W} K[t-s] h_s`` over ``W = block_len`` history slots (taps at
    negative lags are zero). Returns ``[B, C]`` (channelwise) or ``[B, F, C]`` (projected)."""
    w = cache.block_len
    hist = jax.lax.dynamic_slice_in_dim(cache.history, start, w, axis=1)
    # rows w + t - s for s = start + w - 1 .. start, flipped to s = start .. start + w - 1
    taps = jnp.flip(jax.lax.dynamic_slice_in_dim(cache.taps, w + t - start - w + 1, w), 0)
    hist = hist.astype(taps.dtype)
    if projected:
        return jnp.einsum("wf,bwc->bfc", taps, hist)
    return jnp.einsum("wc,bwc->bc", taps, hist)


def _project(z: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Features ``[B, F, C] -> [B, O]`` by ``W: [F, C, O]``; channelwise sums pass through."""
    if weights is None:
        return z
    return jnp.einsum("bfc,fco->bo", z, weights.astype(z.dtype))


def _future_block(cache: FutureFillCache, t: jax.Array, weights: jax.Array | None) -> jax.Array:
    """``F[j] = sum_{s<t} K[t+j-s] h_s`` for ``j < E`` by one FFT over the smallest length
    ``E * 2^j >= t + E`` (history slots ``>= t`` are still zero). Returns ``[B, E, O]``."""
    e, total = cache.block_len, cache.history.shape[1]
    sizes = []
    size = e
    while size < total:
        sizes.append(size)
        size *= 2
    sizes.append(total)
    cdt = cache.taps.dtype

    def branch(size):
        def block(history, taps):
            h = history[:, :size].astype(cdt)
            k = taps[e : e + size]
            y = causal_conv(h, k) if weights is None else causal_conv_project(h, k, weights)
            return jax.lax.dynamic_slice_in_dim(y, t, e, axis=1)

        return block

    index = jnp.sum(jnp.asarray(sizes) < t + e)
    return jax.lax.switch(index, [branch(s) for s in sizes], cache.history, cache.taps)


def _write(cache: ConvCache, h_t: jax.Array) -> jax.Array:
    batch, _, channels = cache.history.shape
    if h_t.shape != (batch, channels):
        raise ValueError(f"step: input must be [{batch}, {channels}], got shape {h_t.shape}")
    if h_t.dtype != cache.history.dtype:
        raise ValueError(
            f"step: input dtype {h_t.dtype} does not match the cache's {cache.history.dtype}"
        )
    check_room(cache.pos, cache.max_len)
    return jax.lax.dynamic_update_slice_in_dim(cache.history, h_t[:, None], cache.pos, axis=1)


def step(
    cache: ConvCache, h_t: jax.Array, weights: jax.Array | None
) -> tuple[ConvCache, jax.Array]:
    """Consume the conv input ``h_t: [B, C]`` at position ``cache.pos``.

    Returns the next cache and ``y_t: [B, O]`` in the compute dtype. Raises ValueError if the
    cache is full (a runtime error under jit) or ``h_t``'s shape or dtype does not match.
    """
    t = cache.pos
    projected = weights is not None
    history = _write(cache, h_t)
    if isinstance(cache, NaiveCache):
        cache = cache.replace(history=history)
        w = cache.block_len
        z = _window_sum(cache, jnp.zeros_like(t), t, projected)  # block 0 always holds s = 0
        z = jax.lax.fori_loop(
            1, t // w + 1, lambda i, acc: acc + _window_sum(cache, i * w, t, projected), z
        )
        return cache.replace(pos=t + 1), _project(z, weights)
    block, start = jax.lax.cond(
        t - cache.epoch_start >= cache.block_len,
        lambda: (_future_block(cache, t, weights), t),
        lambda: (cache.block, cache.epoch_start),
    )
    cache = cache.replace(history=history, block=block, epoch_start=start, pos=t + 1)
    y = jax.lax.dynamic_index_in_dim(block, t - start, axis=1, keepdims=False)
    return cache, y + _project(_window_sum(cache, start, t, projected), weights)


def prefill(cache: ConvCache, h: jax.Array, weights: jax.Array | None) -> ConvCache:
    """Write a prompt's conv inputs ``h: [B, L, C]`` (``1 <= L <= max_len``) into an empty
    cache and advance it to position ``L``; FutureFill starts an epoch there."""
    batch, _, channels = cache.history.shape
    length = h.shape[1]
    if h.ndim != 3 or (h.shape[0], h.shape[2]) != (batch, channels):
        raise ValueError(f"prefill: input must be [{batch}, L, {channels}], got {h.shape}")
    if not 1 <= length <= cache.max_len:
        raise ValueError(f"prefill: length {length} must be in [1, max_len={cache.max_len}]")
    history = cache.history.at[:, :length].set(h.astype(cache.history.dtype))
    pos = jnp.asarray(length, jnp.int32)
    cache = cache.replace(history=history, pos=pos)
    if isinstance(cache, FutureFillCache):
        cache = cache.replace(block=_future_block(cache, pos, weights), epoch_start=pos)
    return cache
