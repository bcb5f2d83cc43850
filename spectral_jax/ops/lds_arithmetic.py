"""The float arithmetics of a distilled LDS: each one small object over one state type.

A distilled layer runs its diagonal LDS (:mod:`spectral_jax.ops.lds`) in one of two arithmetics
(:data:`spectral_jax.validation.Arithmetic`):

* ``plain`` (the default): one float32 (or float64, for references under ``jax.enable_x64``)
  array per state; the readout is a matmul. Its error against the float64 system is the float32
  round-off of the states amplified by the bank's cancelling coefficients (about 2e-5 relative
  for L=8192, K=24, 120 states).
* ``compensated``: every state is a :class:`~spectral_jax.ops.lds_compensated.DoubleFloat` pair
  and the readout is error-free (:mod:`spectral_jax.ops.lds_compensated`), ~1e-7 relative, the
  exact mode for verification. It needs float32 parameters and costs more per step.

The layer looks its arithmetic up in :data:`ARITHMETICS_BY_NAME` and calls the same methods
whichever it is; no layer code branches on the arithmetic. Past its kernels' length a layer
continues a prompt in blocks (:mod:`spectral_jax.ops.lds_continuation`), each the way the
arithmetic's :meth:`~PlainArithmetic.continue_block` does: plain by FFT convolution plus the
carried state's free response, compensated by the exact pair scan.

Each arithmetic also owns the facts the fit and its report need: its ``roundoff`` (the relative
rounding of one state, which the fit weighs against the bank's amplification) and its
``report_key`` (the fit report's entry for the float32 error in this arithmetic).

Shapes: decays ``[*S]``, sequences ``u: [B, L, *S]``, single states ``[B, *S]``. Readout weights
are stored as one array ``[words, ...]`` (``words`` float32 words per coefficient) and unpacked by
:meth:`weights`; states read out as ``states [..., N]`` x ``weights [..., N, R] -> [..., R]``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds, lds_continuation
from spectral_jax.ops import lds_compensated as lc
from spectral_jax.validation import Arithmetic

if TYPE_CHECKING:  # a distilled system holds its arithmetic and passes itself back
    from spectral_jax.ops.distilled_lds import DistilledLDS

UNIT_ROUNDOFF_32 = 2.0**-24


@dataclasses.dataclass(frozen=True)
class PlainArithmetic:
    """Textbook recurrence ``x_t = a x_{t-1} + u_t`` and readout ``x @ W`` in one float dtype."""

    name: ClassVar[Arithmetic] = "plain"
    words: ClassVar[int] = 1
    param_dtypes: ClassVar[tuple[str, ...]] = ("float32", "float64")
    # one float32 round-off per state, which the bank's cancelling coefficients amplify
    roundoff: ClassVar[float] = UNIT_ROUNDOFF_32
    report_key: ClassVar[str] = "rel_fro_err_f32"

    def pack(self, values: np.ndarray, dtype: Any) -> np.ndarray:
        """Host-side: float64 coefficients ``[...]`` -> stored words ``[1, ...]`` in ``dtype``."""
        return np.asarray(values, np.float64).astype(dtype)[None]

    def weights(self, stored: jax.Array) -> jax.Array:
        """Stored words ``[1, ...]`` -> readout weights ``[...]``."""
        return stored[0]

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jnp.zeros(shape, dtype)

    def scan(self, kind: str, decays: jax.Array, u: jax.Array, x0=None):
        """All states ``[B, L, *S]`` by the ``"parallel"`` or the ``"sequential"`` scan."""
        return _PLAIN_SCANS[kind](decays, u, x0)

    def final_state(self, decays: jax.Array, drive: jax.Array, x0=None) -> jax.Array:
        """State ``[B, C, *S]`` after a prompt ``drive: [B, T, C]`` that drives every state of its
        channel (``decays: [*S]``) from ``x0 [B, C, *S]`` (zeros if None), by matmuls against
        decay powers."""
        return lds.driven_final_state(decays, drive, x0)

    def step(self, decays: jax.Array, state: jax.Array, u_t: jax.Array) -> jax.Array:
        return lds.step(decays, state, u_t)

    def drive_step(self, decays: jax.Array, state: jax.Array, drive: jax.Array) -> jax.Array:
        """One step of states ``[B, C, *S]`` whose channel's drive ``[B, C]`` feeds every state
        (``decays [*S]``), both broadcast inside one fused update."""
        return decays * state + drive.reshape(*drive.shape, *(1,) * decays.ndim)

    def readout(self, states: jax.Array, weights: jax.Array) -> jax.Array:
        return jnp.matmul(states[..., None, :], weights, precision=lds.HIGHEST)[..., 0, :]

    def channel_readout(self, states: jax.Array, weights: jax.Array) -> jax.Array:
        """Each channel read out with its own weights: ``states [..., C, N]``, ``weights
        [C, N] -> [..., C]``, one pass over the states (a matmul would broadcast the weights
        to the batch first)."""
        return jnp.sum(states * weights, axis=-1)

    def continue_block(self, system: DistilledLDS, state: jax.Array, xb: jax.Array):
        """One block past the kernels: FFT convolution plus the state's free response
        (:func:`~spectral_jax.ops.lds_continuation.convolved_block`)."""
        return lds_continuation.convolved_block(system, state, xb)


@dataclasses.dataclass(frozen=True)
class CompensatedArithmetic:
    """States as float32 pairs ``hi + lo``; error-free readout (see :mod:`.lds_compensated`)."""

    name: ClassVar[Arithmetic] = "compensated"
    words: ClassVar[int] = 2
    param_dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    # a float32 pair carries about the square of one float32's round-off
    roundoff: ClassVar[float] = UNIT_ROUNDOFF_32**2
    report_key: ClassVar[str] = "rel_fro_err_f32_compensated"

    def pack(self, values: np.ndarray, dtype: Any) -> np.ndarray:
        """Host-side: float64 coefficients ``[...]`` -> float32 ``hi, lo`` words ``[2, ...]``."""
        del dtype  # always float32
        return np.stack([np.asarray(w) for w in lc.split_float64(values)])

    def weights(self, stored: jax.Array) -> lc.DoubleFloat:
        return lc.DoubleFloat(stored[0], stored[1])

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> lc.DoubleFloat:
        zeros = jnp.zeros(shape, jnp.float32)
        return lc.DoubleFloat(zeros, zeros)

    def scan(self, kind: str, decays: jax.Array, u: jax.Array, x0=None):
        return _COMPENSATED_SCANS[kind](decays, u, x0)

    def final_state(self, decays: jax.Array, drive: jax.Array, x0=None) -> lc.DoubleFloat:
        """As :meth:`PlainArithmetic.final_state`, to pair accuracy: the last of the two-scan
        parallel states (so it costs a parallel scan over ``[B, T, C, *S]``)."""
        expanded = drive.reshape(*drive.shape, *(1,) * decays.ndim)
        u = jnp.broadcast_to(expanded, (*drive.shape, *decays.shape))
        states = lc.parallel_scan(jnp.broadcast_to(decays, u.shape[2:]), u, x0)
        return lds.last_state(states)

    def step(self, decays: jax.Array, state: lc.DoubleFloat, u_t: jax.Array) -> lc.DoubleFloat:
        return lc.step(decays, state, u_t)

    def drive_step(self, decays: jax.Array, state: lc.DoubleFloat, drive: jax.Array):
        """As :meth:`PlainArithmetic.drive_step`, by the exact pair step."""
        u = jnp.broadcast_to(drive.reshape(*drive.shape, *(1,) * decays.ndim), state.hi.shape)
        return lc.step(jnp.broadcast_to(decays, state.hi.shape[1:]), state, u)

    def readout(self, states: lc.DoubleFloat, weights: lc.DoubleFloat) -> jax.Array:
        return lc.readout(states, weights)

    def channel_readout(self, states: lc.DoubleFloat, weights: lc.DoubleFloat) -> jax.Array:
        """As :meth:`PlainArithmetic.channel_readout`, error-free."""
        return lc.readout(states, jax.tree.map(lambda w: w[..., None], weights))[..., 0]

    def continue_block(self, system: DistilledLDS, state: lc.DoubleFloat, xb: jax.Array):
        """One block past the kernels by the pair scan, read out error-free
        (:func:`~spectral_jax.ops.lds_continuation.scanned_block`)."""
        return lds_continuation.scanned_block(system, state, xb)


_PLAIN_SCANS = {"parallel": lds.parallel_scan, "sequential": lds.scan}
_COMPENSATED_SCANS = {"parallel": lc.parallel_scan, "sequential": lc.scan}

LDSArithmetic = PlainArithmetic | CompensatedArithmetic
ARITHMETICS_BY_NAME: dict[str, LDSArithmetic] = {
    a.name: a for a in (PlainArithmetic(), CompensatedArithmetic())
}
