"""Compensated ("double-float32") evaluation of a diagonal LDS and of its readout.

A distilled LDS reads its outputs as ``y = sum_j c_j x_j`` with large, cancelling coefficients
``c_j`` (the fit is extremely ill-conditioned), so the float32 rounding of every state ``x_j`` and
of every partial sum is amplified by ``sum_j |c_j x_j| / |y|`` (hundreds for K=24 filters). Here
each state is carried as an unevaluated sum ``hi + lo`` of two float32 numbers and the readout is
accumulated with error-free transformations, so only the final float32 rounding of ``y`` remains.

Everything uses float32 operations only (TPUs have no float64):

* :func:`split` cuts a float32 into a 12-bit head (by masking mantissa bits) and a 12-bit tail.
  Products of two such halves are exact in float32, so every product below is exact, which also
  makes the results immune to compilers fusing ``a * b + c`` into one FMA (Dekker's
  ``TwoProduct`` with a Veltkamp split is not: XLA's CPU backend does fuse, and it breaks).
* :func:`two_sum` (Knuth) returns ``s = fl(a + b)`` and the exact rounding error ``e``.

The parallel path runs the plain float32 :func:`spectral_jax.ops.lds.parallel_scan`, computes the
exact residual ``r_t = u_t + a x_{t-1} - x_t`` of its result with the transformations above, and
scans the residual again (iterative refinement): the two scans give ``hi`` and ``lo`` with a
relative error ~1e-13 instead of ~1e-7. The step path updates ``(hi, lo)`` directly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds

# Keeps the sign, the exponent and the top 11 stored mantissa bits of a float32 (12 significant
# bits with the implicit one); the remaining 12 bits form the tail.
_HEAD_MASK = np.int32(-(1 << 12))


class DoubleFloat(NamedTuple):
    """An array value ``hi + lo`` with ``|lo| <= ulp(hi) / 2`` (both float32, same shape)."""

    hi: jax.Array
    lo: jax.Array


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = head + tail`` exactly, each with at most 12 significant bits (float32 only)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    head = jax.lax.bitcast_convert_type(bits & _HEAD_MASK, jnp.float32)
    return head, x - head


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = fl(a + b)`` and ``e`` with ``s + e == a + b`` exactly (no conditions on ``a, b``)."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def split_float64(values) -> DoubleFloat:
    """Host-side split of float64 coefficients into ``hi = fl32(v)`` and ``lo = fl32(v - hi)``
    (``hi + lo`` equals ``v`` to ~2^-48 relative)."""
    values = np.asarray(values, np.float64)
    hi = values.astype(np.float32)
    lo = (values - hi.astype(np.float64)).astype(np.float32)
    return DoubleFloat(jnp.asarray(hi), jnp.asarray(lo))


def _check_float32(**arrays: jax.Array) -> None:
    for name, x in arrays.items():
        if x.dtype != jnp.float32:
            raise ValueError(f"compensated arithmetic is float32 only; {name} has {x.dtype}")


def _exact_products(a: jax.Array, x: jax.Array) -> tuple[jax.Array, ...]:
    """``a * x`` as four exactly computed float32 products, largest first (``2^0``, ``2^-12``,
    ``2^-12``, ``2^-24`` of ``|a x|``)."""
    a1, a2 = split(a)
    x1, x2 = split(x)
    return a1 * x1, a1 * x2, a2 * x1, a2 * x2


def _add_exact(total: jax.Array, comp: jax.Array, *terms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Add exact ``terms`` to ``total``, collecting every rounding error in ``comp``."""
    for term in terms:
        total, e = two_sum(total, term)
        comp = comp + e
    return total, comp


def step(decays: jax.Array, state: DoubleFloat, u_t: jax.Array) -> DoubleFloat:
    """One compensated step ``x_t = a x_{t-1} + u_t``: ``state: [B, *S]``, ``u_t: [B, *S]``."""
    decays = lds.validate(decays, u_t, state.hi, time_axis=False)
    _check_float32(u_t=u_t, lo=state.lo)
    return _step(decays, state, u_t)


@jax.jit
def _step(decays: jax.Array, state: DoubleFloat, u_t: jax.Array) -> DoubleFloat:
    p11, p12, p21, p22 = _exact_products(decays, state.hi)
    total, comp = _add_exact(u_t, jnp.zeros_like(u_t), p11, p12, p21)
    return DoubleFloat(*two_sum(total, comp + (p22 + decays * state.lo)))


def _scan_args(decays, u: jax.Array, x0: DoubleFloat | None):
    """Validated ``(decays, u, x0)`` for the scans, with a zero initial state by default."""
    decays = lds.validate(decays, u, None if x0 is None else x0.hi, time_axis=True)
    _check_float32(u=u)
    if x0 is None:
        zeros = jnp.zeros((u.shape[0], *decays.shape), u.dtype)
        x0 = DoubleFloat(zeros, zeros)
    return decays, u, x0


def scan(decays: jax.Array, u: jax.Array, x0: DoubleFloat | None = None) -> DoubleFloat:
    """All states as ``hi + lo`` by a sequential ``lax.scan`` of :func:`step`:
    ``u: [B, L, *S] -> [B, L, *S]`` twice."""
    return _scan(*_scan_args(decays, u, x0))


@jax.jit
def _scan(decays: jax.Array, u: jax.Array, x0: DoubleFloat) -> DoubleFloat:
    def advance(state, u_t):
        state = _step(decays, state, u_t)
        return state, state

    _, states = jax.lax.scan(advance, x0, jnp.swapaxes(u, 0, 1))
    return DoubleFloat(*(jnp.swapaxes(s, 0, 1) for s in states))


def parallel_scan(decays: jax.Array, u: jax.Array, x0: DoubleFloat | None = None) -> DoubleFloat:
    """All states as ``hi + lo`` by two parallel scans: ``u: [B, L, *S] -> [B, L, *S]`` twice."""
    return _parallel_scan(*_scan_args(decays, u, x0))


@jax.jit
def _parallel_scan(decays: jax.Array, u: jax.Array, x0: DoubleFloat) -> DoubleFloat:
    hi = lds.parallel_scan(decays, u, x0.hi)
    previous = jnp.concatenate([x0.hi[:, None], hi[:, :-1]], axis=1)
    p11, p12, p21, p22 = _exact_products(decays, previous)
    total, comp = _add_exact(-hi, jnp.zeros_like(hi), p11, u, p12, p21)
    residual = total + (comp + p22)
    residual = residual.at[:, 0].add(decays * x0.lo)
    lo = lds.parallel_scan(decays, residual, jnp.zeros_like(x0.lo))
    return DoubleFloat(*two_sum(hi, lo))


def readout(states: DoubleFloat, weights: DoubleFloat) -> jax.Array:
    """Compensated contraction over the last state axis:
    ``y[..., r] = sum_n (hi + lo)[..., n] * (w_hi + w_lo)[..., n, r]``.

    Args:
      states: ``[..., N]`` (float32 pair).
      weights: ``[..., N, R]`` (float32 pair) whose leading axes broadcast against the states'.
    Returns:
      ``[..., R]`` float32: the exact sum rounded once, up to ~2^-24 of ``sum |terms|`` times
      ``2^-12`` (so cancellation does not amplify round-off).
    """
    _check_float32(states=states.hi, weights=weights.hi)
    if states.hi.shape[-1] != weights.hi.shape[-2]:
        raise ValueError(
            f"states have {states.hi.shape[-1]} entries in the last axis but the weights "
            f"{weights.hi.shape[-2]} in their second-to-last axis"
        )
    return _readout(states, weights)


def pairwise_sum(terms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum ``terms [..., M, R]`` over ``M`` as if in twice the working precision: a pairwise
    tree of :func:`two_sum` whose rounding errors are collected apart (Ogita, Rump and Oishi's
    ``Sum2``, in tree order). Returns ``(s, c)`` ``[..., R]``: ``s + c`` is the sum to
    ``~2^-24 |sum| + depth * 2^-48 sum |terms|``."""
    total = terms
    comp = jnp.zeros((*terms.shape[:-2], terms.shape[-1]), terms.dtype)
    while total.shape[-2] > 1:
        if total.shape[-2] % 2:
            total = jnp.concatenate([total, jnp.zeros_like(total[..., :1, :])], axis=-2)
        total, e = two_sum(total[..., 0::2, :], total[..., 1::2, :])
        comp = comp + jnp.sum(e, axis=-2)
    return total[..., 0, :], comp


# States per iteration of the readout loop: the loop body is vectorised over a block (a loop over
# single states compiles ~N times as much code) and the loop bounds the memory to a block's terms.
READOUT_BLOCK = 8


@jax.jit
def _readout(states: DoubleFloat, weights: DoubleFloat) -> jax.Array:
    N = states.hi.shape[-1]
    block = min(READOUT_BLOCK, N)
    count = -(-N // block)

    def blocks(x: jax.Array, axis: int) -> jax.Array:  # [..., N, ...] -> [count, ..., block, ...]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, count * block - N)
        x = jnp.pad(x, pad)
        axis = axis % x.ndim
        x = x.reshape(*x.shape[:axis], count, block, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    xs = (blocks(states.hi, -1), blocks(states.lo, -1))
    ws = (blocks(weights.hi, -2), blocks(weights.lo, -2))

    def accumulate(carry, block_arrays):
        total, comp = carry
        x_hi, x_lo, w_hi, w_lo = block_arrays
        x_hi, x_lo = x_hi[..., None], x_lo[..., None]  # [..., block, 1]
        w1, w2 = split(w_hi)
        x1, x2 = split(x_hi)
        # The three leading products of every term are exact: compensated tree; the rest is
        # ~2^-24 of them and summed plainly.
        exact = jnp.stack(jnp.broadcast_arrays(w1 * x1, w1 * x2, w2 * x1), axis=-3)
        s, c = pairwise_sum(exact.reshape(*exact.shape[:-3], -1, exact.shape[-1]))
        small = jnp.sum(w2 * x2 + (w_hi * x_lo + w_lo * x_hi), axis=-2)
        total, e = two_sum(total, s)
        return (total, comp + (e + c + small)), None

    lead = jnp.broadcast_shapes(states.hi.shape[:-1], weights.hi.shape[:-2])
    zeros = jnp.zeros((*lead, weights.hi.shape[-1]), jnp.float32)
    (total, comp), _ = jax.lax.scan(accumulate, (zeros, zeros), (*xs, *ws))
    return total + comp
