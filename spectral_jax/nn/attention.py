"""Causal sliding-window multi-head attention with rotary position embeddings, ALiBi biases or
no positions, and an optional score softcap.

Each query at position ``t`` attends to the keys at positions ``t - window + 1 .. t``.
The parallel path costs ``O(L * window)`` (blocks of ``window`` queries attend to their
own block and the previous one); decoding keeps a ring buffer of the last ``window``
keys and values, so memory and time per generated token do not grow with ``t``.

Math lives in pure functions (``rope``, ``sliding_window_mask``, ``masked_attention``,
``sliding_window_attention``); :class:`SlidingWindowAttention` holds the projections.
"""

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


def row_positions(length: int, pad: jax.Array | None) -> jax.Array:
    """Positions of ``length`` left-padded tokens: ``[L]`` (no padding) or ``[B, L]`` with
    ``t - pad[b]`` (negative at row ``b``'s pad positions). pad: [B] int or None."""
    positions = jnp.arange(length)
    return positions if pad is None else positions[None, :] - pad[:, None]


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window: int,
    pad: jax.Array | None = None,
    *,
    softcap: float | None = None,
    slopes: np.ndarray | None = None,
) -> jax.Array:
    """Causal sliding-window attention over one sequence (positions 0..L-1).

    q, k, v: [B, L, H, Dh], q already scaled and rotated. pad: [B] left-pad positions per row
    (their keys are masked), or None. softcap, slopes: as in :func:`masked_attention`.
    Returns [B, L, H, Dh].
    For ``L <= 2 * window`` one dense masked product; otherwise the sequence is cut into
    blocks of ``window`` queries that see their own block and the previous one, so the
    cost is ``O(L * window)`` instead of ``O(L^2)``.
    """
    b, length, h, dh = q.shape
    if length <= 2 * window:
        pos = row_positions(length, pad)
        mask, distance = sliding_window_mask(pos, pos, window), relative_distance(pos, pos)
        return masked_attention(q, k, v, mask, softcap=softcap, slopes=slopes, distance=distance)
    n = -(-length // window)
    extra = n * window - length

    def blocks(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0)))
        return a.reshape(b, n, window, h, dh)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)

    def with_previous(a: jax.Array) -> jax.Array:  # [B, n, W, ...] -> [B, n, 2W, ...]
        prev = jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
        return jnp.concatenate([prev, a], axis=2)

    block_start = np.arange(n)[:, None] * window
    q_pos = jnp.asarray(block_start + np.arange(window))  # [n, W]
    k_pos = jnp.asarray(block_start - window + np.arange(2 * window))  # [n, 2W]; < 0 in block 0
    if pad is not None:  # per-row positions [B, n, W] / [B, n, 2W]
        q_pos, k_pos = q_pos - pad[:, None, None], k_pos - pad[:, None, None]
    mask = sliding_window_mask(q_pos, k_pos, window)  # [(B,) n, W, 2W]
    out = masked_attention(
        qb,
        with_previous(kb),
        with_previous(vb),
        mask,
        softcap=softcap,
        slopes=slopes,
        distance=relative_distance(q_pos, k_pos),
    )
    return out.reshape(b, n * window, h, dh)[:, :length]


class SlidingWindowAttention(nnx.Module):
    """Multi-head causal sliding-window attention with rotary embeddings.

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

    def _attend(self, x: jax.Array, pad: jax.Array | None):
        """x: [B, L, D] -> (y [B, L, D], rotated k and v [B, L, H, Dh])."""
        x = x.astype(self.config.dtype)
        q, k, v = self._project(x, row_positions(x.shape[1], pad))
        out = sliding_window_attention(q, k, v, self.config.window, pad, **self._scores())
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
    ) -> tuple[jax.Array, KVCache]:
        """Run the prompt x: [B, L, D]; returns (y [B, L, D], cache at position L).

        pad: [B] int, left-pad positions of each row (their keys are masked; rotary positions
        start at 0 at each row's first real token), or None. The cache holds K/V in x's dtype.
        """
        self._check_sequence(x, "prefill")
        y, k, v = self._attend(x, pad)
        batch, length, w = x.shape[0], x.shape[1], self.config.window
        keep = min(length, w)
        slots = np.arange(length - keep, length) % w  # ring slots of the last `keep` tokens
        cache = self.init_cache(batch, length, x.dtype, options)
        return y, KVCache(
            k=cache.k.at[:, slots].set(k[:, length - keep :].astype(x.dtype)),
            v=cache.v.at[:, slots].set(v[:, length - keep :].astype(x.dtype)),
            pos=jnp.asarray(length, jnp.int32),
            pad=cache.pad if pad is None else jnp.asarray(pad, jnp.int32),
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
