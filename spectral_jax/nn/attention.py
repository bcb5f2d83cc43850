"""Causal sliding-window multi-head attention with rotary position embeddings.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spectral_jax.ops.conv_decode import check_room

_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_dtype(field: str, dtype: Any) -> None:
    try:
        name = jnp.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"{field}={dtype!r} is not a dtype; allowed: {_FLOAT_DTYPES}") from err
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"{field}={dtype!r} is not allowed; allowed: {_FLOAT_DTYPES}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Sliding-window attention hyper-parameters.

    d_model: width of the input and output; num_heads must divide it and the head width
    ``d_model // num_heads`` must be even (rotary embeddings rotate pairs of channels).
    window: number of keys each query sees, itself included (>= 1).
    max_len: longest sequence (prompt plus generated tokens) the layer accepts.
    rope_base: base of the rotary frequencies ``base ** (-2i / head_dim)``.
    dtype: activation dtype of the projections and attention values; parameters are
    float32 and softmax statistics are always computed in float32.
    """

    d_model: int
    num_heads: int
    window: int
    max_len: int
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for field in ("d_model", "num_heads", "window", "max_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive int")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
        if self.head_dim % 2:
            raise ValueError(
                f"head width d_model // num_heads = {self.head_dim} must be even for rotary "
                f"embeddings (d_model={self.d_model}, num_heads={self.num_heads})"
            )
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base={self.rope_base!r} must be > 1")
        _check_dtype("dtype", self.dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@struct.dataclass
class KVCache:
    """Decode state of one attention layer: a ring buffer of the last ``window`` keys.

    k, v: [B, W, H, Dh] with rotary embedding already applied to ``k``; position ``p``
    lives in slot ``p % W``. pos: int32 scalar, the position of the next token
    (= number of tokens consumed). max_len: static limit on ``pos``.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    max_len: int = struct.field(pytree_node=False)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate channel pairs ``(i, i + Dh/2)`` by angle ``positions * base**(-2i/Dh)``.

    x: [..., L, H, Dh]; positions: [L] integer. Returns x's shape and dtype; the
    rotation is computed in float32 (float64 for float64 x).
    """
    half = x.shape[-1] // 2
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = base ** (-jnp.arange(half, dtype=cdt) / half)
    angles = positions.astype(cdt)[:, None] * inv_freq  # [L, Dh/2]
    cos = jnp.cos(angles)[:, None, :]  # [L, 1, Dh/2], broadcast over heads
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half].astype(cdt), x[..., half:].astype(cdt)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def sliding_window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """Boolean mask, True where query ``i`` may see key ``j``: ``0 <= q - k < window``
    and ``k >= 0`` (negative key positions mark empty slots).

    q_pos: [..., Lq]; k_pos: [..., Lk] integer. Returns [..., Lq, Lk] bool.
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    return (diff >= 0) & (diff < window) & (k_pos[..., None, :] >= 0)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with a boolean mask; every query must see at least one key.

    q: [..., Lq, H, Dh] (already scaled); k, v: [..., Lk, H, Dh]; mask: broadcastable to
    [..., Lq, Lk]. Logits and softmax in float32 (float64 for float64 inputs).
    Returns [..., Lq, H, Dh] in v's dtype.
    """
    cdt = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=cdt)
    logits = jnp.where(mask[..., None, :, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    """Causal sliding-window attention over one sequence (positions 0..L-1).

    q, k, v: [B, L, H, Dh], q already scaled and rotated. Returns [B, L, H, Dh].
    For ``L <= 2 * window`` one dense masked product; otherwise the sequence is cut into
    blocks of ``window`` queries that see their own block and the previous one, so the
    cost is ``O(L * window)`` instead of ``O(L^2)``.
    """
    b, length, h, dh = q.shape
    if length <= 2 * window:
        pos = jnp.arange(length)
        return masked_attention(q, k, v, sliding_window_mask(pos, pos, window))
    n = -(-length // window)
    pad = n * window - length

    def blocks(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return a.reshape(b, n, window, h, dh)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)

    def with_previous(a: jax.Array) -> jax.Array:  # [B, n, W, ...] -> [B, n, 2W, ...]
        prev = jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
        return jnp.concatenate([prev, a], axis=2)

    block_start = np.arange(n)[:, None] * window
    q_pos = block_start + np.arange(window)  # [n, W]
    k_pos = block_start - window + np.arange(2 * window)  # [n, 2W]; < 0 in block 0's prev
    mask = sliding_window_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), window)  # [n, W, 2W]
    out = masked_attention(qb, with_previous(kb), with_previous(vb), mask)
    return out.reshape(b, n * window, h, dh)[:, :length]


class SlidingWindowAttention(nnx.Module):
    """Multi-head causal sliding-window attention with rotary embeddings.

    x: [B, L, d_model] -> [B, L, d_model] in ``config.dtype``; parameters float32.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.qkv = nnx.Linear(
            d, 3 * d, use_bias=False, dtype=config.dtype, rngs=rngs,
            kernel_metadata={"logical_axes": ("embed", "qkv")},
        )  # fmt: skip
        self.out = nnx.Linear(
            d, d, use_bias=False, dtype=config.dtype, rngs=rngs,
            kernel_metadata={"logical_axes": ("heads", "embed")},
        )  # fmt: skip

    def _project(self, x: jax.Array, positions: jax.Array):
        """x: [B, L, D] -> rotated, scaled q and rotated k, plain v: each [B, L, H, Dh]."""
        c = self.config
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, c.num_heads, c.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = rope(q, positions, c.rope_base) * jnp.asarray(1.0 / math.sqrt(c.head_dim), q.dtype)
        return q, rope(k, positions, c.rope_base), v

    def _check_sequence(self, x: jax.Array, where: str) -> None:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"{where}: x must be [B, L, {c.d_model}], got shape {x.shape}")
        if not 1 <= x.shape[1] <= c.max_len:
            raise ValueError(f"{where}: length {x.shape[1]} must be in [1, max_len={c.max_len}]")

    def _attend(self, x: jax.Array):
        """x: [B, L, D] -> (y [B, L, D], rotated k and v [B, L, H, Dh])."""
        x = x.astype(self.config.dtype)
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        out = sliding_window_attention(q, k, v, self.config.window)
        return self.out(out.reshape(x.shape)), k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> y: [B, L, D]."""
        self._check_sequence(x, "SlidingWindowAttention")
        return self._attend(x)[0]

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> KVCache:
        """Empty cache for ``batch`` sequences of at most ``max_len`` tokens, K/V in ``dtype``."""
        c = self.config
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int")
        if not isinstance(max_len, int) or not 1 <= max_len <= c.max_len:
            raise ValueError(f"max_len={max_len!r} must be an int in [1, {c.max_len}]")
        _check_dtype("dtype", dtype)
        shape = (batch, min(c.window, max_len), c.num_heads, c.head_dim)
        zeros = jnp.zeros(shape, dtype)
        return KVCache(k=zeros, v=zeros, pos=jnp.zeros((), jnp.int32), max_len=max_len)

    def prefill(self, x: jax.Array) -> tuple[jax.Array, KVCache]:
        """Run the prompt x: [B, L, D]; returns (y [B, L, D], cache at position L).

        The cache holds K/V in x's dtype and allows up to ``config.max_len`` tokens in all.
        """
        self._check_sequence(x, "prefill")
        y, k, v = self._attend(x)
        length, w = x.shape[1], min(self.config.window, self.config.max_len)
        keep = min(length, w)
        slots = np.arange(length - keep, length) % w  # ring slots of the last `keep` tokens
        cache = self.init_cache(x.shape[0], self.config.max_len, x.dtype)
        return y, KVCache(
            k=cache.k.at[:, slots].set(k[:, length - keep :].astype(x.dtype)),
            v=cache.v.at[:, slots].set(v[:, length - keep :].astype(x.dtype)),
            pos=jnp.asarray(length, jnp.int32),
            max_len=cache.max_len,
        )

    def step(self, cache: KVCache, x_t: jax.Array) -> tuple[KVCache, jax.Array]:
        """One token x_t: [B, D] at position ``cache.pos`` -> (next cache, y_t [B, D]).

        Raises ValueError if the cache is full (eagerly, or as a runtime error under jit),
        or if x_t's batch size, width or dtype does not match the cache.
        """
        c = self.config
        batch, w = cache.k.shape[0], cache.k.shape[1]
        if x_t.shape != (batch, c.d_model):
            raise ValueError(f"step: x_t must be [{batch}, {c.d_model}], got shape {x_t.shape}")
        if x_t.dtype != cache.k.dtype:
            raise ValueError(f"step: x_t dtype {x_t.dtype} does not match cache {cache.k.dtype}")
        check_room(cache.pos, cache.max_len)
        x = x_t.astype(c.dtype)[:, None, :]
        q, k, v = self._project(x, cache.pos[None])
        slot = cache.pos % w
        new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), slot, 1)
        new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), slot, 1)
        valid = jnp.arange(w) <= cache.pos  # slots not yet written hold no token
        out = masked_attention(q, new_k.astype(c.dtype), new_v.astype(c.dtype), valid[None, :])
        y = self.out(out.reshape(batch, c.d_model))
        return KVCache(k=new_k, v=new_v, pos=cache.pos + 1, max_len=cache.max_len), y
