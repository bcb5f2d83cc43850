"""Causal sliding-window multi-head attention with rotary position embeddings, ALiBi biases or
no positions, and an optional score softcap.

Each query at position ``t`` attends to the keys at positions ``t - window + 1 .. t``.
The parallel path costs ``O(L * window)`` (blocks of ``window`` queries attend to their
own block and the previous one, processed in groups of blocks whose scores fit a byte budget,
:data:`SCORE_BUDGET_BYTES`); decoding keeps a ring buffer of the last ``window`` keys and values,
so memory and time per generated token do not grow with ``t``. A prefill may continue from such
a cache: the ring buffer is the prefix of the chunk's first window, so a long prompt runs in
chunks of bounded memory (:meth:`SlidingWindowAttention.prefill`).

Math lives in pure functions (``rope``, ``sliding_window_mask``, ``masked_attention``,
``sliding_window_attention``); :class:`SlidingWindowAttention` holds the projections."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.validation import finite_float, float_dtype, one_of, positive_int

Positions = Literal["rope", "alibi", "none"]
"""How attention sees positions: rotary embeddings, ALiBi distance biases (Flash STU's), none."""
POSITIONS: tuple[str, ...] = get_args(Positions)
ALIBI_SCALE = 0.25  # Flash STU multiplies the ALiBi slopes by this interpolation factor


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Flash STU's ALiBi slopes ``[H]`` (float64): for ``n = 2^m`` heads the geometric sequence
    ``r, r^2, ..., r^n`` with ``r = 2^(-8/n)``; otherwise those of the largest power of two
    ``n < H``, then every other slope of ``2n`` heads (``r^1, r^3, ...`` of ``r = 2^(-4/n)``)
    for the ``H - n`` remaining heads; all times :data:`ALIBI_SCALE`."""
    positive_int("alibi_slopes", "num_heads", num_heads)

    def geometric(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 / n * np.arange(1, n + 1))

    n = 1 << (num_heads.bit_length() - 1)
    slopes = geometric(n)
    if n != num_heads:
        slopes = np.concatenate([slopes, geometric(2 * n)[0::2][: num_heads - n]])
    return slopes * ALIBI_SCALE


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Sliding-window attention hyper-parameters.

    d_model: width of the input and output; num_heads must divide it and, with rotary
    positions, the head width ``d_model // num_heads`` must be even (pairs of channels rotate).
    window: number of keys each query sees, itself included (>= 1); flash-attn's
    ``window_size=(W, 0)`` is ``window = W + 1``.
    positions: ``"rope"`` (rotary embeddings of q and k), ``"alibi"`` (the score of query ``i``
    and key ``j`` gets ``-slope_h * (i - j)``, slopes of :func:`alibi_slopes`) or ``"none"``.
    rope_base: base of the rotary frequencies ``base ** (-2i / head_dim)``.
    softcap: None, or ``c > 0``: scores ``s = q.k / sqrt(Dh)`` become ``c * tanh(s / c)``
    before the ALiBi bias is added (flash-attn's order).
    bias: biases in the q/k/v and output projections.
    dtype: activation dtype of the projections and attention values; parameters are
    float32 and softmax statistics are always computed in float32.

    The layer has no length limit: the parallel path costs ``O(L * window)`` for any ``L`` and
    the decode cache is a ring buffer of ``window`` keys.
    """

    d_model: int
    num_heads: int
    window: int
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32
    positions: Positions = "rope"
    softcap: float | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        for field in ("d_model", "num_heads", "window"):
            positive_int("AttentionConfig", field, getattr(self, field))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"AttentionConfig.num_heads={self.num_heads} must divide d_model={self.d_model}"
            )
        one_of("AttentionConfig", "positions", self.positions, POSITIONS)
        if self.softcap is not None:
            finite_float("AttentionConfig", "softcap", self.softcap, strict=True)
        if not isinstance(self.bias, bool):
            raise ValueError(f"AttentionConfig.bias={self.bias!r} must be True or False")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"head width d_model // num_heads = {self.head_dim} must be even for rotary "
                f"embeddings (d_model={self.d_model}, num_heads={self.num_heads})"
            )
        if not self.rope_base > 1.0:
            raise ValueError(f"AttentionConfig.rope_base={self.rope_base!r} must be > 1")
        float_dtype("AttentionConfig", "dtype", self.dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@struct.dataclass
class KVCache:
    """Decode state of one attention layer: a ring buffer of the last ``window`` keys.

    k, v: [B, W, H, Dh] with rotary embedding already applied to ``k``; position ``p``
    lives in slot ``p % W``. pos: int32 scalar, the position of the next token
    (= number of positions consumed, left padding included). pad: [B] int32, the number of
    left-pad positions of each row: row ``b``'s token at position ``p`` has rotary position
    ``p - pad[b]``, and keys at positions ``< pad[b]`` are never attended to.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    pad: jax.Array


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate channel pairs ``(i, i + Dh/2)`` by angle ``positions * base**(-2i/Dh)``.

    x: [..., L, H, Dh]; positions: integer, broadcastable to ``x.shape[:-2]`` (e.g. [L], or
    [B, L] for per-row positions). Returns x's shape and dtype; the rotation is computed in
    float32 (float64 for float64 x).
    """
    half = x.shape[-1] // 2
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = base ** (-jnp.arange(half, dtype=cdt) / half)
    angles = positions.astype(cdt)[..., None] * inv_freq  # [..., L, Dh/2]
    cos = jnp.cos(angles)[..., None, :]  # [..., L, 1, Dh/2], broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(cdt), x[..., half:].astype(cdt)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def sliding_window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """Boolean mask, True where query ``i`` may see key ``j``: ``0 <= q - k < window``
    and ``k >= 0`` (negative key positions mark empty slots and left padding).

    q_pos: [..., Lq]; k_pos: [..., Lk] integer. Returns [..., Lq, Lk] bool.
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    return (diff >= 0) & (diff < window) & (k_pos[..., None, :] >= 0)


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None = None,
    slopes: np.ndarray | None = None,
    distance: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with a boolean mask, an optional score softcap and ALiBi biases.

    q: [..., Lq, H, Dh] (already scaled); k, v: [..., Lk, H, Dh]; mask: broadcastable to
    [..., Lq, Lk]. softcap: ``c``, scores ``s`` become ``c * tanh(s / c)``; slopes: [H] ALiBi
    slopes with distance: query minus key position, broadcastable to [..., Lq, Lk]: the capped
    scores get ``-slopes[h] * distance`` (flash-attn's order). Logits and softmax in float32
    (float64 for float64 inputs). Returns [..., Lq, H, Dh] in v's dtype. Masked keys get weight
    exactly 0; a query that sees no key at all (a left-pad position) gets a finite output that
    callers discard.
    """
    cdt = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=cdt)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if slopes is not None:
        bias = jnp.asarray(slopes, cdt)[:, None, None] * distance[..., None, :, :].astype(cdt)
        logits = logits - bias
    logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(cdt).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def relative_distance(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """``q - k`` for positions q_pos: [..., Lq] and k_pos: [..., Lk] -> [..., Lq, Lk]."""
    return q_pos[..., :, None] - k_pos[..., None, :]


def row_positions(length: int, pad: jax.Array | None, start: jax.Array | int = 0) -> jax.Array:
    """Rotary positions of ``length`` tokens at positions ``start .. start + length - 1``:
    ``[L]`` (no padding) or ``[B, L]`` with ``p - pad[b]`` (negative at row ``b``'s pad
    positions). pad: [B] int, each row's left-pad count from position 0, or None; start: int or
    int32 scalar."""
    positions = start + jnp.arange(length)
    return positions if pad is None else positions[None, :] - pad[:, None]


SCORE_BUDGET_BYTES = 64 * 2**20
"""Bytes of attention logits the blocked path forms at once: its blocks of ``window`` queries
are processed in groups of ``max(1, SCORE_BUDGET_BYTES // (B * H * W * 2W * itemsize))`` blocks
(itemsize of the float32 logits), one group after another in a ``lax.map``, so peak memory is
bounded by the group, not by the length. 64 MiB is one group for every block of a 2^14-token
chunk at batch 1 with 4 heads and W = 128 (512 KiB a block), so short prompts run as one
product; the softmax's temporaries add about twice the logits."""


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window: int,
    pad: jax.Array | None = None,
    prefix: tuple[jax.Array, jax.Array] | None = None,
    start: jax.Array | int = 0,
    score_budget: int = SCORE_BUDGET_BYTES,
    *,
    softcap: float | None = None,
    slopes: np.ndarray | None = None,
) -> jax.Array:
    """Causal sliding-window attention of the queries at positions ``start .. start + T - 1``.

    q, k, v: [B, T, H, Dh] of those positions, q already scaled and rotated. prefix: the keys
    and values ``([B, W, H, Dh], [B, W, H, Dh])`` of the ``W = window`` positions
    ``start - W .. start - 1``, oldest first (a continuation: those before position 0 or a row's
    pad are masked), or None when ``start`` is 0 (nothing precedes the queries). pad: [B]
    left-pad count of each row from position 0 (keys at positions ``< pad[b]`` are masked), or
    None. score_budget: see :data:`SCORE_BUDGET_BYTES`. softcap, slopes: as in
    :func:`masked_attention`. Returns [B, T, H, Dh].

    For ``T <= 2 * window`` one dense masked product; otherwise the queries are cut into blocks
    of ``window`` that see their own block and the previous one (the prefix for the first), so
    the cost is ``O(T * window)`` instead of ``O(T^2)``, and the blocks are processed in groups
    whose logits fit ``score_budget``.
    """
    if prefix is None and not (isinstance(start, int) and start == 0):
        raise ValueError(
            f"sliding_window_attention: start={start!r} needs the prefix of the {window} keys "
            "before it (the ring buffer of a KVCache); without a prefix start must be 0"
        )
    b, length, h, dh = q.shape
    if length <= 2 * window:
        q_pos = k_pos = row_positions(length, pad, start)
        if prefix is not None:
            k, v = (jnp.concatenate([p, a], axis=1) for p, a in zip(prefix, (k, v), strict=True))
            k_pos = row_positions(window + length, pad, start - window)
        mask, distance = sliding_window_mask(q_pos, k_pos, window), relative_distance(q_pos, k_pos)
        return masked_attention(q, k, v, mask, softcap=softcap, slopes=slopes, distance=distance)
    n = -(-length // window)
    cdt = jnp.promote_types(q.dtype, jnp.float32)
    group = max(1, score_budget // (b * h * window * 2 * window * jnp.dtype(cdt).itemsize))
    groups = -(-n // group)
    if groups == 1:
        group = n

    def blocks(a: jax.Array, before: jax.Array | None) -> jax.Array:
        """[B, T, ...] -> [B, groups * group + 1, W, ...]: the prefix block (zeros if None), then
        the blocks of ``a`` padded with zero blocks."""
        before = jnp.zeros_like(a[:, :window]) if before is None else before.astype(a.dtype)
        a = jnp.pad(a, ((0, 0), (0, groups * group * window - length), (0, 0), (0, 0)))
        return jnp.concatenate([before, a], axis=1).reshape(b, groups * group + 1, window, h, dh)

    before_k, before_v = (None, None) if prefix is None else prefix
    kb, vb, qb = blocks(k, before_k), blocks(v, before_v), blocks(q, None)[:, 1:]
    # per block: queries at block_start + [0, W), keys at block_start - W + [0, 2W); those before
    # position 0 (the zero prefix block when there is no prefix) are masked by being negative
    block_start = start + jnp.arange(groups * group)[:, None] * window  # [blocks, 1]
    q_pos = block_start + jnp.arange(window)
    k_pos = block_start - window + jnp.arange(2 * window)

    def attend(qg, prev_k, cur_k, prev_v, cur_v, qp, kp):
        """One group of ``g`` blocks: qg [B, g, W, H, Dh], keys/values of the previous and the
        own blocks [B, g, W, H, Dh], positions [g, W] / [g, 2W] -> [B, g, W, H, Dh]."""
        if pad is not None:  # per-row positions [B, g, W] / [B, g, 2W]
            qp, kp = qp - pad[:, None, None], kp - pad[:, None, None]
        keys = jnp.concatenate([prev_k, cur_k], axis=2)
        values = jnp.concatenate([prev_v, cur_v], axis=2)
        mask, distance = sliding_window_mask(qp, kp, window), relative_distance(qp, kp)
        return masked_attention(
            qg, keys, values, mask, softcap=softcap, slopes=slopes, distance=distance
        )

    operands = (qb, kb[:, :-1], kb[:, 1:], vb[:, :-1], vb[:, 1:])
    if groups == 1:
        out = attend(*operands, q_pos, k_pos)
    else:

        def by_group(a: jax.Array) -> jax.Array:  # [B, G * g, ...] -> [G, B, g, ...]
            return a.reshape(b, groups, group, *a.shape[2:]).swapaxes(0, 1)

        def split_positions(p: jax.Array) -> jax.Array:  # [G * g, X] -> [G, g, X]
            return p.reshape(groups, group, -1)

        out = jax.lax.map(
            lambda args: attend(*args),
            (*map(by_group, operands), split_positions(q_pos), split_positions(k_pos)),
        )
        out = out.swapaxes(0, 1)
    return out.reshape(b, groups * group * window, h, dh)[:, :length]


class SlidingWindowAttention(nnx.Module):
    """Multi-head causal sliding-window attention (rotary or ALiBi positions, or none).

    x: [B, L, D] -> [B, L, D] in ``config.dtype``; parameters float32. Any length:
    ``length_limit`` is None.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.qkv = nnx.Linear(
            d, 3 * d, use_bias=config.bias, dtype=config.dtype, rngs=rngs,
            kernel_metadata={"logical_axes": ("embed", "qkv")},
            bias_metadata={"logical_axes": ("qkv",)},
        )  # fmt: skip
        self.out = nnx.Linear(
            d, d, use_bias=config.bias, dtype=config.dtype, rngs=rngs,
            kernel_metadata={"logical_axes": ("heads", "embed")},
            bias_metadata={"logical_axes": ("embed",)},
        )  # fmt: skip

    @property
    def length_limit(self) -> None:
        """None: the parallel path takes any length and the decode cache has constant size."""
        return None

    def _project(self, x: jax.Array, positions: jax.Array):
        """x: [B, L, D] -> scaled q, k, v: each [B, L, H, Dh], q and k rotated with rotary
        positions. positions: [L] or [B, L] (see :func:`rope`)."""
        c = self.config
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, c.num_heads, c.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if c.positions == "rope":
            q, k = rope(q, positions, c.rope_base), rope(k, positions, c.rope_base)
        return q * jnp.asarray(1.0 / math.sqrt(c.head_dim), q.dtype), k, v

    def _scores(self) -> dict[str, Any]:
        """The score options of :func:`masked_attention`: softcap and ALiBi slopes."""
        c = self.config
        slopes = alibi_slopes(c.num_heads) if c.positions == "alibi" else None
        return {"softcap": c.softcap, "slopes": slopes}

    def _check_sequence(self, x: jax.Array, where: str) -> None:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model or x.shape[1] < 1:
            raise ValueError(f"{where}: x must be [B, L >= 1, {c.d_model}], got shape {x.shape}")

    def _attend(self, x: jax.Array, pad: jax.Array | None, cache: KVCache | None = None):
        """x: [B, T, D] at positions ``start .. start + T - 1`` -> (y [B, T, D], rotated k and
        v [B, T, H, Dh]); start is ``cache.pos`` (0 without a cache), whose ring buffer gives the
        keys before it. pad: [B] each row's left-pad count from position 0, or None."""
        x = x.astype(self.config.dtype)
        w = self.config.window
        start, prefix = 0, None
        if cache is not None:
            start = cache.pos
            order = (start + jnp.arange(w)) % w  # slot of position start - W + j, j = 0 .. W-1
            prefix = tuple(a[:, order].astype(x.dtype) for a in (cache.k, cache.v))
        q, k, v = self._project(x, row_positions(x.shape[1], pad, start))
        out = sliding_window_attention(q, k, v, w, pad, prefix, start, **self._scores())
        return self.out(out.reshape(x.shape)), k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> y: [B, L, D]."""
        self._check_sequence(x, "SlidingWindowAttention")
        return self._attend(x, None)[0]

    def init_cache(
        self, batch: int, max_len: int, dtype: Any, options: DecodeOptions = DEFAULT_DECODE
    ) -> KVCache:
        """Empty cache for ``batch`` sequences, K/V in ``dtype``: ``window`` slots whatever
        ``max_len`` (accepted for the common decode API; must be a positive integer). The layer
        has no decode options."""
        del options
        c = self.config
        positive_int("SlidingWindowAttention.init_cache", "batch", batch)
        positive_int("SlidingWindowAttention.init_cache", "max_len", max_len)
        float_dtype("SlidingWindowAttention.init_cache", "dtype", dtype)
        zeros = jnp.zeros((batch, c.window, c.num_heads, c.head_dim), dtype)
        return KVCache(
            k=zeros, v=zeros, pos=jnp.zeros((), jnp.int32), pad=jnp.zeros((batch,), jnp.int32)
        )

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Run x: [B, T, D] at positions ``pos .. pos + T - 1``; returns (y [B, T, D], the cache
        at position ``pos + T``).

        cache: None (``pos`` = 0, today's prompt), or the cache of the positions before (from
        ``init_cache``, ``prefill`` or ``step``), whose ring buffer is the window's prefix.
        pad: [B] int, the left-pad positions of each row counted from ``pos`` (row ``b``'s
        positions ``< pos + pad[b]`` are padding; negative or past ``T`` in a later chunk): their
        keys are masked and rotary positions start at each row's first real token. None: no
        padding without a cache, the cache's with one. The cache holds K/V in x's dtype.
        """
        self._check_sequence(x, "prefill")
        batch, length, w = x.shape[0], x.shape[1], self.config.window
        if cache is None:
            start, base = 0, self.init_cache(batch, 1, x.dtype, options)
        else:
            if cache.k.shape[0] != batch or cache.k.dtype != x.dtype:
                raise ValueError(
                    f"prefill: x is [{batch}, ...] {x.dtype} but the cache holds "
                    f"{cache.k.shape[0]} rows of {cache.k.dtype}; continue with the batch and "
                    "dtype it was built for"
                )
            start, base = cache.pos, cache
        row_pad = base.pad if pad is None else start + jnp.asarray(pad, jnp.int32)
        y, k, v = self._attend(x, None if cache is None and pad is None else row_pad, cache)
        keep = min(length, w)
        slots = (start + jnp.arange(length - keep, length)) % w  # ring slots of the last tokens
        return y, KVCache(
            k=base.k.at[:, slots].set(k[:, length - keep :].astype(x.dtype)),
            v=base.v.at[:, slots].set(v[:, length - keep :].astype(x.dtype)),
            pos=jnp.asarray(start + length, jnp.int32),
            pad=row_pad,
        )

    def step(self, cache: KVCache, x_t: jax.Array) -> tuple[KVCache, jax.Array]:
        """One token x_t: [B, D] at position ``cache.pos`` -> (next cache, y_t [B, D]).

        Raises ValueError if x_t's batch size, width or dtype does not match the cache.
        """
        c = self.config
        batch, w = cache.k.shape[0], cache.k.shape[1]
        if x_t.shape != (batch, c.d_model):
            raise ValueError(f"step: x_t must be [{batch}, {c.d_model}], got shape {x_t.shape}")
        if x_t.dtype != cache.k.dtype:
            raise ValueError(f"step: x_t dtype {x_t.dtype} does not match cache {cache.k.dtype}")
        x = x_t.astype(c.dtype)[:, None, :]
        q, k, v = self._project(x, (cache.pos - cache.pad)[:, None])
        slot = cache.pos % w
        new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, 1)
        new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, 1)
        # slot s holds position pos - ((pos - s) mod W); it is a real token of row b if that
        # position is >= pad[b] (which also excludes slots not yet written)
        held = cache.pos - (cache.pos - jnp.arange(w)) % w  # [W]
        valid = held[None, :] >= cache.pad[:, None]  # [B, W]
        out = masked_attention(
            q,
            new_k.astype(c.dtype),
            new_v.astype(c.dtype),
            valid[:, None, :],
            distance=(cache.pos - held)[None, :],
            **self._scores(),
        )
        y = self.out(out.reshape(batch, c.d_model))
        return KVCache(k=new_k, v=new_v, pos=cache.pos + 1, pad=cache.pad), y
