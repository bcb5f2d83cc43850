"""Continuing a prompt past a distilled layer's kernels, in blocks of bounded memory.

The kernels (:class:`~spectral_jax.ops.distilled_lds.DistilledLDS`) cover the bank's length
``max_len``; later positions continue from the state carried so far, one block at a time, by
the arithmetic's own ``continue_block`` (:mod:`spectral_jax.ops.lds_arithmetic`):

* :func:`convolved_block` (plain): an FFT convolution plus the carried state's free response
  ``sum_n w_n a_n^(t+1) x_n``, a float32 matmul against decay powers whose rounding is that of
  one plain readout;
* :func:`scanned_block` (compensated): the pair scan from the carried state, read out error-free
  (a float32 matmul would lose the pair accuracy to the cancelling coefficients).

Shapes: a block ``xb [B, T, d_in]``, states ``[B, C, S, n]``, outputs ``[B, T, d_out]`` (before
AR terms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from spectral_jax.ops import lds

if TYPE_CHECKING:  # the system calls this module, and passes itself
    from spectral_jax.ops.distilled_lds import DistilledLDS

# Positions past the kernels' length continue in blocks of this many, so the memory held at once
# (at most the compensated scan's states ``[B, TAIL_BLOCK, C, S, n]``) does not grow with the
# prompt.
TAIL_BLOCK = 2048


def convolved_block(system: DistilledLDS, state: jax.Array, xb: jax.Array):
    """One block ``xb [B, T <= max_len, d_in]`` from a plain ``state``: FFT convolution plus
    the state's free response; the state after it by decay-power matmuls. Returns
    ``(state, y [B, T, d_out])``."""
    y = system.convolve(xb) + system.free_response(state, xb.shape[1])
    return system.final_state(xb, state), y


def scanned_block(system: DistilledLDS, state: Any, xb: jax.Array):
    """One block ``xb [B, T, d_in]`` from ``state`` by the arithmetic's parallel scan. Returns
    ``(state, y [B, T, d_out])``."""
    states = system.scan("parallel", xb, state)
    return lds.last_state(states), system.read(states)


def continue_in_blocks(system: DistilledLDS, x: jax.Array, state: Any) -> tuple[Any, jax.Array]:
    """Past the kernels' length: ``x [B, T, d_in]`` continues from ``state`` in blocks of
    :data:`TAIL_BLOCK` positions, or of the kernels' length if shorter (a ``lax.scan`` over the
    whole blocks, then the rest), each by the arithmetic's ``continue_block``, so memory does
    not grow with ``T``. Returns (the state after the last position, outputs before AR terms
    ``[B, T, d_out]``)."""

    def block(carry, xb):
        return system.arithmetic.continue_block(system, carry, xb)

    B, T, d_in = x.shape
    size = min(TAIL_BLOCK, system.kernels.shape[0])
    whole = T // size * size
    outputs = []
    if whole:
        blocks = x[:, :whole].reshape(B, whole // size, size, d_in).swapaxes(0, 1)
        state, ys = jax.lax.scan(block, state, blocks)  # ys: [count, B, block, d_out]
        outputs.append(ys.swapaxes(0, 1).reshape(B, whole, -1))
    if whole < T:
        state, y = block(state, x[:, whole:])
        outputs.append(y)
    return state, jnp.concatenate(outputs, axis=1)
