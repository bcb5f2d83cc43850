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

Layout for speed on CPU: the history is time-major (``[T, B, C]``) and the taps are stored
reversed (``taps[T - 1 - l] = K[l]``, then ``block_len`` zero rows), so the taps of a window of
positions are one ``dynamic_slice`` aligned with the history slice, and a window sum is one
matrix product (reductions over a middle axis are many times slower in XLA:CPU). The history is
written inside the loop that reads it, so it is updated in place, never copied per token.
Everything is a pure function of explicit pytrees; only the shapes are static, so a decode loop
runs in ``lax.scan`` without Python work per token.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spectral_jax.ops.conv import causal_conv, causal_conv_project
from spectral_jax.validation import DECODE_STRATEGIES, DecodeStrategy, one_of, positive_int

NAIVE_BLOCK = 512  # history positions read per loop iteration by the naive strategy


@struct.dataclass
class NaiveCache:
    """Decode state of the naive strategy.

    history: ``[T, B, C]`` conv inputs at positions ``< pos``, zeros after
      (``T = max_len`` rounded up to a multiple of ``block_len``).
    taps: ``[T + block_len, F]`` kernel taps reversed, lag ``l`` at row ``T - 1 - l``, then
      zeros.
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

    history: ``[T, B, C]`` conv inputs at positions ``< pos``, zeros after (``T = max_len + E``).
    taps: ``[T + E, F]`` kernel taps reversed, lag ``l`` at row ``T - 1 - l``, then zeros.
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


def default_block_len(strategy: DecodeStrategy, max_len: int) -> int:
    """Naive: ``min(NAIVE_BLOCK, max_len)``. FutureFill: the power of two nearest
    ``2 sqrt(max_len log2 max_len)``, which balances the ``N E`` in-epoch work against the
    ``N^2 log N / E`` FFT work (the factor 2 was measured for d=128 on a 2-core CPU, where an
    FFT costs more per element than the memory-bound in-epoch sum)."""
    if strategy == "naive":
        return min(NAIVE_BLOCK, max_len)
    balance = 2.0 * math.sqrt(max_len * max(math.log2(max_len), 1.0))
    return min(1 << round(math.log2(balance)), max_len)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Sums run in float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _reversed_taps(kernels: jax.Array, length: int, pad: int, dtype: Any) -> jax.Array:
    """``kernels: [L, F] -> [length + pad, F]``: lag ``l < length`` at row ``length - 1 - l``
    (zeros for lags past ``L``), then ``pad`` zero rows."""
    kernels = kernels[:length].astype(dtype)
    return jnp.pad(jnp.flip(kernels, 0), ((length - kernels.shape[0], pad), (0, 0)))


def _check_init(kernels, weights, batch, max_len, channels, block_len) -> None:
    for name, value in (("batch", batch), ("max_len", max_len), ("channels", channels)):
        positive_int("", name, value)
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
    positive_int("", "block_len", block_len)
    if block_len > max_len:
        raise ValueError(f"block_len={block_len} must be in [1, max_len={max_len}]")


def init_cache(
    strategy: DecodeStrategy,
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
    one_of("", "strategy", strategy, DECODE_STRATEGIES)
    if block_len is None:
        block_len = default_block_len(strategy, max_len)
    _check_init(kernels, weights, batch, max_len, channels, block_len)
    cdt = compute_dtype(dtype)
    pos = jnp.zeros((), jnp.int32)
    if strategy == "naive":
        length = -(-max_len // block_len) * block_len
        return NaiveCache(
            history=jnp.zeros((length, batch, channels), dtype),
            taps=_reversed_taps(kernels, length, block_len, cdt),
            pos=pos,
            max_len=max_len,
            block_len=block_len,
        )
    length = max_len + block_len
    out = channels if weights is None else weights.shape[2]
    return FutureFillCache(
        history=jnp.zeros((length, batch, channels), dtype),
        taps=_reversed_taps(kernels, length, block_len, cdt),
        block=jnp.zeros((batch, block_len, out), cdt),
        epoch_start=pos,
        pos=pos,
        max_len=max_len,
        block_len=block_len,
    )


def _window_sum(
    history: jax.Array, taps: jax.Array, w: int, start: jax.Array, t: jax.Array, projected: bool
) -> jax.Array:
    """``sum_{start<=s<start+w} K[t-s] h_s`` over ``w`` history slots (lags < 0 read the zero
    rows of ``taps``). Returns ``[B, C]`` (channelwise) or ``[F, B, C]`` (projected)."""
    total, batch, channels = history.shape
    hist = jax.lax.dynamic_slice_in_dim(history, start, w).astype(taps.dtype)  # [w, B, C]
    window = jax.lax.dynamic_slice_in_dim(taps, total - 1 - t + start, w)  # K[t - s], [w, F]
    if projected:
        z = window.T @ hist.reshape(w, batch * channels)
        return z.reshape(-1, batch, channels)
    # a product with a ones row: XLA:CPU reduces a leading axis far slower than it multiplies
    ones = jnp.ones((1, w), taps.dtype)
    return (ones @ (window[:, None, :] * hist).reshape(w, -1)).reshape(batch, channels)


def _project(z: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Features ``[F, B, C] -> [B, O]`` by ``W: [F, C, O]``; channelwise sums pass through."""
    if weights is None:
        return z
    return jnp.einsum("fbc,fco->bo", z, weights.astype(z.dtype))


def _future_block(
    history: jax.Array, taps: jax.Array, e: int, t: jax.Array, weights: jax.Array | None
) -> jax.Array:
    """``F[j] = sum_{s<t} K[t+j-s] h_s`` for ``j < e`` by one FFT over the smallest length
    ``e * 2^j >= t + e``; history slots ``>= t`` are masked out. Returns ``[B, e, O]``."""
    total = history.shape[0]
    sizes = []
    size = e
    while size < total:
        sizes.append(size)
        size *= 2
    sizes.append(total)

    def branch(size):
        def block(history):
            past = (jnp.arange(size) < t)[:, None, None]
            h = jnp.where(past, history[:size], 0).astype(taps.dtype).swapaxes(0, 1)
            k = jnp.flip(taps[total - size : total], 0)  # lags 0 .. size - 1
            y = causal_conv(h, k) if weights is None else causal_conv_project(h, k, weights)
            return jax.lax.dynamic_slice_in_dim(y, t, e, axis=1)

        return block

    index = jnp.sum(jnp.asarray(sizes) < t + e)
    return jax.lax.switch(index, [branch(s) for s in sizes], history)


# ---- capacity: the one check shared by every decode cache (attention KV, naive, FutureFill)


def _raise_if_full(pos: Any, max_len: int) -> None:
    """Host-side check; ``pos`` is an int or an array of positions (under vmap)."""
    full = np.asarray(pos) >= max_len
    if np.any(full):
        first = int(np.asarray(pos)[full].flat[0])
        raise ValueError(f"step: cache is full: position {first} >= max_len={max_len}")


def check_room(pos: jax.Array, max_len: int) -> None:
    """Raise ValueError if a cache at position ``pos`` cannot take one more token.

    Concrete ``pos``: raises now. Traced ``pos`` (under jit/scan): a host callback raises,
    surfacing as a runtime error naming the position. The callback sits in a ``cond`` so it
    only runs when the cache is full; vmap turns the cond into a select that runs it every
    time, which is why the callback checks the position itself.
    """
    if isinstance(pos, jax.core.Tracer):
        jax.lax.cond(
            pos >= max_len,
            lambda p: jax.debug.callback(_raise_if_full, p, max_len),
            lambda p: None,
            pos,
        )
    else:
        _raise_if_full(pos, max_len)


def _check_step_input(cache: ConvCache, h_t: jax.Array) -> None:
    _, batch, channels = cache.history.shape
    if h_t.shape != (batch, channels):
        raise ValueError(f"step: input must be [{batch}, {channels}], got shape {h_t.shape}")
    if h_t.dtype != cache.history.dtype:
        raise ValueError(
            f"step: input dtype {h_t.dtype} does not match the cache's {cache.history.dtype}"
        )
    check_room(cache.pos, cache.max_len)


def step(
    cache: ConvCache, h_t: jax.Array, weights: jax.Array | None
) -> tuple[ConvCache, jax.Array]:
    """Consume the conv input ``h_t: [B, C]`` at position ``cache.pos``.

    Returns the next cache and ``y_t: [B, O]`` in the compute dtype. Raises ValueError if the
    cache is full (a runtime error under jit) or ``h_t``'s shape or dtype does not match.

    The write of ``h_t`` happens inside the loop / cond that reads the history, so XLA updates
    the one history buffer in place instead of copying it every token.
    """
    _check_step_input(cache, h_t)
    t, w, taps = cache.pos, cache.block_len, cache.taps
    projected = weights is not None

    def write(history):
        return jax.lax.dynamic_update_slice_in_dim(history, h_t[None], t, axis=0)

    if isinstance(cache, NaiveCache):

        def add_block(i, carry):  # blocks 0 .. t // w hold the positions s <= t
            acc, history = carry
            history = write(history)  # rewriting the same row keeps the buffer a loop carry
            return acc + _window_sum(history, taps, w, i * w, t, projected), history

        z = jnp.zeros(((taps.shape[1],) if projected else ()) + h_t.shape, taps.dtype)
        z, history = jax.lax.fori_loop(0, t // w + 1, add_block, (z, cache.history))
        return cache.replace(history=history, pos=t + 1), _project(z, weights)

    # The refresh is a while loop run 0 or 1 times that rewrites h_t: XLA then updates the
    # history in place (a cond reading it, or a loop passing it through, forces a copy).
    def refresh(carry):
        _, _, history, _ = carry
        return _future_block(history, taps, w, t, weights), t, write(history), False

    block, start, history, _ = jax.lax.while_loop(
        lambda carry: carry[3],
        refresh,
        (cache.block, cache.epoch_start, write(cache.history), t - cache.epoch_start >= w),
    )
    z = _window_sum(history, taps, w, start, t, projected)  # s = start .. t
    y = jax.lax.dynamic_index_in_dim(block, t - start, axis=1, keepdims=False)
    cache = cache.replace(history=history, block=block, epoch_start=start, pos=t + 1)
    return cache, y + _project(z, weights)


def prefill(cache: ConvCache, h: jax.Array, weights: jax.Array | None) -> ConvCache:
    """Write a prompt's conv inputs ``h: [B, L, C]`` (``1 <= L <= max_len``) into an empty
    cache and advance it to position ``L``; FutureFill starts an epoch there."""
    _, batch, channels = cache.history.shape
    length = h.shape[1]
    if h.ndim != 3 or (h.shape[0], h.shape[2]) != (batch, channels):
        raise ValueError(f"prefill: input must be [{batch}, L, {channels}], got {h.shape}")
    if not 1 <= length <= cache.max_len:
        raise ValueError(f"prefill: length {length} must be in [1, max_len={cache.max_len}]")
    history = cache.history.at[:length].set(h.swapaxes(0, 1).astype(cache.history.dtype))
    pos = jnp.asarray(length, jnp.int32)
    cache = cache.replace(history=history, pos=pos)
    if isinstance(cache, FutureFillCache):
        block = _future_block(history, cache.taps, cache.block_len, pos, weights)
        cache = cache.replace(block=block, epoch_start=pos)
    return cache
