"""Causal sliding-window multi-head attention with rotary position embeddings, ALiBi biases or
no positions, and an optional score softcap.

Each query at position ``t`` attends to the keys at positions ``t - window + 1 .. t``. The
parallel path costs ``O(L * window)`` in bounded memory; decoding keeps a ring buffer of the last
``window`` keys and values, so memory and time per generated token do not grow with ``t``. A
prefill may continue from such a cache: the ring buffer is the prefix of the chunk's first
window, so a long prompt runs in chunks of bounded memory (:meth:`SlidingWindowAttention.prefill`).

The math lives in pure functions in :mod:`spectral_jax.ops.attention`;
:class:`SlidingWindowAttention` holds the projections, the cache and the checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.ops.attention import (
    alibi_slopes,
    masked_attention,
    rope,
    row_positions,
    sliding_window_attention,
)
from spectral_jax.validation import finite_float, float_dtype, one_of, positive_int

Positions = Literal["rope", "alibi", "none"]
"""How attention sees positions: rotary embeddings, ALiBi distance biases (Flash STU's), none."""
POSITIONS: tuple[str, ...] = get_args(Positions)


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
