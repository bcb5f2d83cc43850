"""Token-by-token decoding of causal convolutions: the naive and the FutureFill caches.

A convolutional layer maps its conv inputs ``h_s: [C]`` to ``y_t = sum_{s<=t} K[t-s] . h_s``,
with taps ``K[l]`` at lag ``l``, contracted one of two ways, as the layer's projection object says
(:mod:`spectral_jax.ops.projection`; the cache keeps it):

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

:func:`extend` consumes a chunk of ``T`` positions at once, from any position, by two FFT
convolutions (the past's contribution and the chunk's own); :func:`prefill` is ``extend`` from
an empty cache.

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

from spectral_jax.ops.projection import Params, STUProjection
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
    projection: the contraction's object (static; :mod:`spectral_jax.ops.projection`).
    """

    history: jax.Array
    taps: jax.Array
    pos: jax.Array
    max_len: int = struct.field(pytree_node=False)
    block_len: int = struct.field(pytree_node=False)
    projection: STUProjection = struct.field(pytree_node=False)

    @classmethod
    def empty(cls, projection, kernels, params, batch, max_len, channels, dtype, block_len):
        """Position 0 (arguments as in :func:`init_cache`)."""
        length = -(-max_len // block_len) * block_len
        return cls(
            history=jnp.zeros((length, batch, channels), dtype),
            taps=_reversed_taps(kernels, length, block_len, compute_dtype(dtype)),
            pos=jnp.zeros((), jnp.int32),
            max_len=max_len,
            block_len=block_len,
            projection=projection,
        )

    def step(self, h_t: jax.Array, params: Params) -> tuple[NaiveCache, jax.Array]:
        """As :func:`step`, unchecked: the sum over every past block, ``O(t)`` work."""
        t, w, taps, projection = self.pos, self.block_len, self.taps, self.projection

        def add_block(i, carry):  # blocks 0 .. t // w hold the positions s <= t
            acc, history = carry
            history = _write(history, h_t, t)  # rewriting the same row keeps it a loop carry
            return acc + _window_sum(projection, history, taps, w, i * w, t), history

        z = jnp.zeros(projection.features_shape(taps.shape[1], *h_t.shape), taps.dtype)
        z, history = jax.lax.fori_loop(0, t // w + 1, add_block, (z, self.history))
        return self.replace(history=history, pos=t + 1), projection.project(z, params)

    @property
    def future_len(self) -> int:
        """Positions past ``pos`` whose contribution from the past :func:`extend` precomputes:
        none."""
        return 0

    def start_future(self, block: jax.Array) -> NaiveCache:
        """Nothing is kept of the (empty) ``block [B, 0, O]``."""
        return self


@struct.dataclass
class FutureFillCache:
    """Decode state of the epoched FutureFill strategy.

    history: ``[T, B, C]`` conv inputs at positions ``< pos``, zeros after (``T = max_len + E``).
    taps: ``[T + E, F]`` kernel taps reversed, lag ``l`` at row ``T - 1 - l``, then zeros.
    block: ``[B, E, O]`` contribution of the inputs before ``epoch_start`` to positions
      ``epoch_start .. epoch_start + E - 1`` (compute dtype, projected).
    epoch_start, pos: int32 scalars. max_len: static limit on ``pos``; block_len: ``E``.
    projection: the contraction's object (static; :mod:`spectral_jax.ops.projection`).
    """

    history: jax.Array
    taps: jax.Array
    block: jax.Array
    epoch_start: jax.Array
    pos: jax.Array
    max_len: int = struct.field(pytree_node=False)
    block_len: int = struct.field(pytree_node=False)
    projection: STUProjection = struct.field(pytree_node=False)

    @classmethod
    def empty(cls, projection, kernels, params, batch, max_len, channels, dtype, block_len):
        """Position 0 (arguments as in :func:`init_cache`)."""
        cdt = compute_dtype(dtype)
        length = max_len + block_len
        pos = jnp.zeros((), jnp.int32)
        return cls(
            history=jnp.zeros((length, batch, channels), dtype),
            taps=_reversed_taps(kernels, length, block_len, cdt),
            block=jnp.zeros((batch, block_len, projection.out_features(params, channels)), cdt),
            epoch_start=pos,
            pos=pos,
            max_len=max_len,
            block_len=block_len,
            projection=projection,
        )

    def step(self, h_t: jax.Array, params: Params) -> tuple[FutureFillCache, jax.Array]:
        """As :func:`step`, unchecked: an FFT refresh when an epoch ends, then the in-epoch sum.

        The refresh is a while loop run 0 or 1 times that rewrites ``h_t``: XLA then updates the
        history in place (a cond reading it, or a loop passing it through, forces a copy)."""
        t, w, taps, projection = self.pos, self.block_len, self.taps, self.projection

        def refresh(carry):
            _, _, history, _ = carry
            block = _future_block(projection, history, taps, w, t, params)
            return block, t, _write(history, h_t, t), False

        block, start, history, _ = jax.lax.while_loop(
            lambda carry: carry[3],
            refresh,
            (self.block, self.epoch_start, _write(self.history, h_t, t), t - self.epoch_start >= w),
        )
        z = _window_sum(projection, history, taps, w, start, t)  # s = start .. t
        y = jax.lax.dynamic_index_in_dim(block, t - start, axis=1, keepdims=False)
        cache = self.replace(history=history, block=block, epoch_start=start, pos=t + 1)
        return cache, y + projection.project(z, params)

    @property
    def future_len(self) -> int:
        """Positions past ``pos`` whose contribution from the past :func:`extend` precomputes:
        an epoch, ``E``."""
        return self.block_len

    def start_future(self, block: jax.Array) -> FutureFillCache:
        """Start an epoch at ``pos`` whose past contribution is ``block [B, E, O]``."""
        return self.replace(block=block, epoch_start=self.pos)


ConvCache = NaiveCache | FutureFillCache
CACHE_BY_STRATEGY: dict[str, type[NaiveCache] | type[FutureFillCache]] = {
    "naive": NaiveCache,
    "futurefill": FutureFillCache,
}
"""The one place a strategy name is dispatched: each cache class steps itself and says what
:func:`extend` precomputes for it."""


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


def _check_init(projection, kernels, params, batch, max_len, channels, block_len) -> None:
    for name, value in (("batch", batch), ("max_len", max_len), ("channels", channels)):
        positive_int("", name, value)
    if kernels.ndim != 2 or kernels.shape[0] < max_len:
        raise ValueError(
            f"kernels must be [L, F] with L >= max_len={max_len}, got shape {kernels.shape}"
        )
    projection.check_contraction(kernels, params, channels)
    positive_int("", "block_len", block_len)
    if block_len > max_len:
        raise ValueError(f"block_len={block_len} must be in [1, max_len={max_len}]")


def init_cache(
    strategy: DecodeStrategy,
    projection: STUProjection,
    kernels: jax.Array,
    params: Params,
    batch: int,
    max_len: int,
    channels: int,
    dtype: Any,
    block_len: int | None = None,
) -> ConvCache:
    """Empty cache (position 0) for ``batch`` sequences of at most ``max_len`` tokens.

    Args:
      strategy: ``"naive"`` or ``"futurefill"``.
      projection: the contraction's object (:mod:`spectral_jax.ops.projection`): channelwise
        (tensordot) or projected by the weights it reads from ``params`` (full).
      kernels: taps ``[L, F]`` with ``L >= max_len`` (only lags ``< max_len`` are kept).
      params: the layer's learned arrays by name (full: ``M_plus``, ``M_minus``).
      channels: ``C``; dtype: dtype of the stored history (and of the inputs to ``step``).
      block_len: naive read block / FutureFill epoch length (default :func:`default_block_len`).
    """
    one_of("", "strategy", strategy, DECODE_STRATEGIES)
    if block_len is None:
        block_len = default_block_len(strategy, max_len)
    _check_init(projection, kernels, params, batch, max_len, channels, block_len)
    cache = CACHE_BY_STRATEGY[strategy]
    return cache.empty(projection, kernels, params, batch, max_len, channels, dtype, block_len)


def _write(history: jax.Array, h_t: jax.Array, t: jax.Array) -> jax.Array:
    """``history [T, B, C]`` with ``h_t [B, C]`` at row ``t``."""
    return jax.lax.dynamic_update_slice_in_dim(history, h_t[None], t, axis=0)


def _window_sum(
    projection: STUProjection,
    history: jax.Array,
    taps: jax.Array,
    w: int,
    start: jax.Array,
    t: jax.Array,
) -> jax.Array:
    """``sum_{start<=s<start+w} K[t-s] h_s`` over ``w`` history slots (lags < 0 read the zero
    rows of ``taps``), as the projection's window features (``[B, C]`` or ``[F, B, C]``)."""
    hist = jax.lax.dynamic_slice_in_dim(history, start, w).astype(taps.dtype)  # [w, B, C]
    window = jax.lax.dynamic_slice_in_dim(taps, history.shape[0] - 1 - t + start, w)  # [w, F]
    return projection.window_features(window, hist)


def _future_block(
    projection: STUProjection,
    history: jax.Array,
    taps: jax.Array,
    e: int,
    t: jax.Array,
    params: Params,
) -> jax.Array:
    """``F[j] = sum_{s<t} K[t+j-s] h_s`` for ``j < e`` by one FFT over the smallest length
    ``e * 2^j >= t + e`` (zeros without an FFT at ``t = 0``); history slots ``>= t`` are masked
    out. Returns ``[B, e, O]``. Memory: the projection's bounded ``convolve`` of the first
    ``size`` history slots, ``O(B size (C + O))`` (:mod:`spectral_jax.ops.conv`)."""
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
            y = projection.convolve(h, _lags(taps, total, size), params)
            return jax.lax.dynamic_slice_in_dim(y, t, e, axis=1)

        return block

    def no_past(history):
        shape = (history.shape[1], e, projection.out_features(params, history.shape[2]))
        return jnp.zeros(shape, taps.dtype)

    index = jnp.where(t == 0, 0, 1 + jnp.sum(jnp.asarray(sizes) < t + e))
    return jax.lax.switch(index, [no_past] + [branch(s) for s in sizes], history)


def _lags(taps: jax.Array, total: int, count: int) -> jax.Array:
    """Kernel taps ``[count, F]`` of lags ``0 .. count - 1`` from the reversed ``taps`` of a
    history of ``total`` slots."""
    return jnp.flip(taps[total - count : total], 0)


# ---- capacity: the one check shared by every decode cache (attention KV, naive, FutureFill)


def _raise_if_full(pos: Any, max_len: int, count: int) -> None:
    """Host-side check; ``pos`` is an int or an array of positions (under vmap)."""
    full = np.asarray(pos) + count > max_len
    if np.any(full):
        first = int(np.asarray(pos)[full].flat[0])
        if count == 1:
            raise ValueError(f"step: cache is full: position {first} >= max_len={max_len}")
        raise ValueError(
            f"extend: {count} tokens from position {first} pass max_len={max_len}: "
            "feed at most max_len - pos tokens, or make a cache with a larger max_len"
        )


def check_room(pos: jax.Array, max_len: int, count: int = 1) -> None:
    """Raise ValueError if a cache at position ``pos`` cannot take ``count`` more tokens.

    Concrete ``pos``: raises now. Traced ``pos`` (under jit/scan): a host callback raises,
    surfacing as a runtime error naming the position. The callback sits in a ``cond`` so it
    only runs when the cache is full; vmap turns the cond into a select that runs it every
    time, which is why the callback checks the position itself.
    """
    if isinstance(pos, jax.core.Tracer):
        jax.lax.cond(
            pos + count > max_len,
            lambda p: jax.debug.callback(_raise_if_full, p, max_len, count),
            lambda p: None,
            pos,
        )
    else:
        _raise_if_full(pos, max_len, count)


def _check_step_input(cache: ConvCache, h_t: jax.Array) -> None:
    _, batch, channels = cache.history.shape
    if h_t.shape != (batch, channels):
        raise ValueError(f"step: input must be [{batch}, {channels}], got shape {h_t.shape}")
    if h_t.dtype != cache.history.dtype:
        raise ValueError(
            f"step: input dtype {h_t.dtype} does not match the cache's {cache.history.dtype}"
        )
    check_room(cache.pos, cache.max_len)


def step(cache: ConvCache, h_t: jax.Array, params: Params) -> tuple[ConvCache, jax.Array]:
    """Consume the conv input ``h_t: [B, C]`` at position ``cache.pos`` (``params`` as in
    :func:`init_cache`), the way the cache's own strategy does.

    Returns the next cache and ``y_t: [B, O]`` in the compute dtype. Raises ValueError if the
    cache is full (a runtime error under jit) or ``h_t``'s shape or dtype does not match.

    The write of ``h_t`` happens inside the loop that reads the history, so XLA updates the one
    history buffer in place instead of copying it every token.
    """
    _check_step_input(cache, h_t)
    return cache.step(h_t, params)


def extend(cache: ConvCache, h: jax.Array, params: Params) -> tuple[ConvCache, jax.Array]:
    """Consume the conv inputs ``h: [B, T, C]`` at positions ``pos .. pos + T - 1`` (any
    ``cache.pos``, 0 included; ``params`` as in :func:`init_cache`), as ``T`` calls of
    :func:`step` would, and advance the cache to ``pos + T``; FutureFill starts an epoch there.

    Returns the next cache and ``y: [B, T, O]`` in the compute dtype, projected, as :func:`step`
    returns them. ``h`` is stored in the cache's dtype (the sums then read it as ``step``'s).
    Raises ValueError if ``h`` is not ``[B, T, C]`` with the cache's ``B`` and ``C`` and
    ``T >= 1``, or if ``pos + T > max_len`` (a runtime error under jit).

    Work and memory are those of two bounded FFT convolutions: the past (slots ``< pos``) on
    the ``T + E`` positions from ``pos`` (``E``: the cache's :attr:`future_len`, the epoch that
    FutureFill starts after the chunk; 0 for naive), over at most the history's length; and the
    chunk itself on those positions, over ``T + E``.
    """
    total, batch, channels = cache.history.shape
    if h.ndim != 3 or (h.shape[0], h.shape[2]) != (batch, channels) or h.shape[1] < 1:
        raise ValueError(f"extend: input must be [{batch}, T >= 1, {channels}], got {h.shape}")
    length, ahead = h.shape[1], cache.future_len
    check_room(cache.pos, cache.max_len, length)
    h = h.astype(cache.history.dtype)
    history = jax.lax.dynamic_update_slice_in_dim(cache.history, h.swapaxes(0, 1), cache.pos, 0)
    taps, projection, span = cache.taps, cache.projection, length + ahead
    past = _future_block(projection, history, taps, span, cache.pos, params)  # [B, span, O]
    chunk = jnp.pad(h.astype(taps.dtype), ((0, 0), (0, ahead), (0, 0)))
    y = past + projection.convolve(chunk, _lags(taps, total, span), params)
    cache = cache.replace(history=history, pos=cache.pos + length)
    return cache.start_future(y[:, length:]), y[:, :length]


def prefill(cache: ConvCache, h: jax.Array, params: Params) -> ConvCache:
    """:func:`extend` an empty cache by a prompt's conv inputs ``h: [B, L, C]``
    (``1 <= L <= max_len``), keeping only the cache (at position ``L``)."""
    return extend(cache, h, params)[0]
