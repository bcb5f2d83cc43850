"""The math of causal sliding-window multi-head attention, as pure functions: rotary embeddings
(:func:`rope`), Flash STU's ALiBi slopes, the window mask, masked softmax attention with an
optional score softcap, and the parallel path over a whole sequence
(:func:`sliding_window_attention`).

Each query at position ``t`` attends to the keys at positions ``t - window + 1 .. t``. The
parallel path costs ``O(L * window)``: blocks of ``window`` queries attend to their own block and
the previous one, processed in groups of blocks whose scores fit a byte budget
(:data:`SCORE_BUDGET_BYTES`). :mod:`spectral_jax.nn.attention` holds the layer.

Shapes: queries, keys and values ``[B, L, H, Dh]``; positions ``[L]`` or ``[B, L]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.validation import positive_int

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
