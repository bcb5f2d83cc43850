"""The math of a distilled STU layer: its diagonal LDS, driven, read out and run over prompts.

A :class:`DistilledLDS` bundles what that math needs (the layer holds the arrays; see
:class:`spectral_jax.nn.lds_layer.LDSLayer`): the projection's and the arithmetic's objects
(:mod:`spectral_jax.ops.projection`, :mod:`spectral_jax.ops.lds_arithmetic`), the decays, the
stored readout words, the prefill kernels and the spectral parameters. Its methods are pure
functions of those; no method branches on the projection or the arithmetic.

Shapes: layer inputs ``x [B, T, d_in]``, LDS inputs (drives) ``[..., C]``, states
``[..., C, S, n]`` in the arithmetic's state type, outputs before AR terms ``[..., d_out]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from spectral_jax.ops import lds, lds_continuation
from spectral_jax.ops.lds_arithmetic import LDSArithmetic
from spectral_jax.ops.projection import STUProjection
from spectral_jax.validation import ScanKind

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledLDS:
    """One distilled layer's LDS.

    Attributes:
      projection, arithmetic: the layer's projection and arithmetic objects.
      decays: ``[S, n]``. readout: the arithmetic's stored words ``[words, ...]``.
      kernels: ``[max_len, F]`` impulse responses of the readout (formed in float64).
      params: the spectral parameters by name (``M_plus``/``M_minus`` or ``M_in``).
    """

    projection: STUProjection
    arithmetic: LDSArithmetic
    decays: jax.Array
    readout: jax.Array
    kernels: jax.Array
    params: Mapping[str, jax.Array]

    def drive(self, x: jax.Array) -> jax.Array:
        """LDS inputs ``[..., C]`` from layer inputs ``[..., d_in]``."""
        return self.projection.conv_input(self.params, x, HIGHEST)

    def expand(self, drive: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every state's input ``[..., C, S, n]`` and decays ``[C, S, n]``, from ``[..., C]``."""
        u = jnp.broadcast_to(drive[..., None, None], drive.shape + self.decays.shape)
        return u, jnp.broadcast_to(self.decays, (drive.shape[-1], *self.decays.shape))

    def read(self, states: Any) -> jax.Array:
        """Outputs before AR terms: ``states [..., C, S, n] -> [..., d_out]``."""
        weights = self.arithmetic.weights(self.readout)
        return self.projection.lds_read(self.arithmetic, states, weights, self.params)

    def convolve(self, x: jax.Array) -> jax.Array:
        """Outputs before AR terms by FFT with the kernels: ``x [B, T <= max_len, d_in]``."""
        return self.projection.convolve(self.drive(x), self.kernels[: x.shape[1]], self.params)

    def final_state(self, x: jax.Array, x0: Any = None) -> Any:
        """The state ``[B, C, S, n]`` after ``x [B, T, d_in]`` from ``x0`` (zeros if None)."""
        return self.arithmetic.final_state(self.decays, self.drive(x), x0)

    def advance(self, n: jax.Array, state: jax.Array) -> jax.Array:
        """A plain ``state [..., C, S, n]`` ``n`` steps on with zero inputs: ``a^n x``."""
        return lds.decay_powers(self.decays, n) * state

    def free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs before AR terms ``[B, length, d_out]`` of a plain ``state [B, C, S, n]`` with
        zero inputs: ``y[t] = sum_n w_n a_n^(t+1) x_n``."""
        weights = self.arithmetic.weights(self.readout)
        t = jnp.arange(1, length + 1).reshape(length, 1, 1)
        decay_powers = lds.decay_powers(self.decays, t)  # [T, S, n]
        return self.projection.free_response(decay_powers, state, weights, self.params)

    def scan(self, kind: str, x: jax.Array, x0: Any = None) -> Any:
        """Every state ``[B, T, C, S, n]`` of ``x [B, T, d_in]`` by the arithmetic's
        ``"parallel"`` or ``"sequential"`` scan from ``x0``."""
        u, decays = self.expand(self.drive(x))
        return self.arithmetic.scan(kind, decays, u, x0)

    def sequence(self, x: jax.Array, scan: ScanKind) -> tuple[jax.Array, Any]:
        """The one place the scan kind is chosen: ``x [B, T, d_in]`` -> (outputs before AR terms
        ``[B, T, d_out]``, state after position ``T - 1``).

        ``"fft"``: the kernels' length by FFT and the state by decay-power matmuls, then the
        rest in blocks (:func:`spectral_jax.ops.lds_continuation.continue_in_blocks`);
        ``"parallel"`` / ``"sequential"``: every state by a scan.
        """
        if scan != "fft":
            states = self.scan(scan, x)
            return self.read(states), lds.last_state(states)
        head = x[:, : self.kernels.shape[0]]
        y, state = self.convolve(head), self.final_state(head)
        if x.shape[1] == head.shape[1]:
            return y, state
        state, tail = lds_continuation.continue_in_blocks(self, x[:, head.shape[1] :], state)
        return jnp.concatenate([y, tail], axis=1), state

    def zeros(self, batch: int, channels: int) -> Any:
        """The empty state ``[batch, channels, S, n]`` in the arithmetic's state type."""
        return self.arithmetic.zeros((batch, channels, *self.decays.shape), self.decays.dtype)

    def step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
        """One position ``x_t [B, d_in]``: (the next state, outputs before AR terms
        ``[B, d_out]``). The drive ``[B, C]`` and the decays ``[S, n]`` broadcast inside the
        update (nothing of the state's size is formed besides it)."""
        state = self.arithmetic.drive_step(self.decays, state, self.drive(x_t))
        return state, self.read(state)


# Prompt positions per matmul of the reduced final state (bounds its power table
# ``[chunk, P, C]``).
SLOT_CHUNK = 512


def slot_powers(fields: jax.Array, n: jax.Array) -> jax.Array:
    """``decay^n`` (complex) for integer ``n >= 0`` broadcastable against the decays' five
    ``fields [5, ...]`` (:func:`spectral_jax.distill.reduce.block_tables`), as
    ``sign^n exp(n log|decay|) (cos + i sin)(n phi)`` (phase error ``~n eps |phi|``,
    ``|phi| <= pi / 2``)."""
    odd = (n % 2 == 1) & (fields[4] < 0)
    n = n.astype(fields.dtype)
    magnitude = jnp.where(odd, -1.0, 1.0) * jnp.exp(n * fields[2])
    phase = n * fields[3]
    return jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))


@dataclasses.dataclass(frozen=True, eq=False)
class ReducedLDS(DistilledLDS):
    """A tensordot layer's LDS reduced per channel (:mod:`spectral_jax.distill.reduce`), in real
    2-state blocks (:func:`~spectral_jax.distill.reduce.pack_blocks`): block ``p`` of channel
    ``c`` holds ``(x, y)`` with ``x' = Re(mu1) x - Im(mu1) y + u[c]``,
    ``y' = Im(mu1) x + Re(mu2) y + e u[c]``, read as ``y[c] = sum_p wx x + wy y``. Its
    ``n``-step map is ``[[Re mu1^n, -Im mu1^n], [Im mu1^n, Re mu2^n]]`` (a rotation for a pair,
    a diagonal for two real decays). Plain arithmetic only.

    Attributes (beyond :class:`DistilledLDS`'s): ``decays`` is the table ``[11, P, C]``
    (``mu1``'s and ``mu2``'s fields, then ``e``); ``readout`` is ``[1, 2, P, C]`` (``wx, wy``).
    States are real ``[B, 2, P, C]`` (``x`` then ``y`` planes, channels last, so every update
    runs along the batch's channels in one pass).
    """

    def _powers(self, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mu1^n, mu2^n)`` complex, ``n`` broadcastable against ``[P, C]``."""
        return slot_powers(self.decays[0:5], n), slot_powers(self.decays[5:10], n)

    def advance(self, n: jax.Array, state: jax.Array) -> jax.Array:
        """The blocks' ``n``-step map applied to ``state [..., 2, P, C]``."""
        p1, p2 = self._powers(n)
        x, y = state[..., 0, :, :], state[..., 1, :, :]
        return jnp.stack([p1.real * x - p1.imag * y, p1.imag * x + p2.real * y], axis=-3)

    def _inputs(self, drive: jax.Array) -> jax.Array:
        """The state's input ``[..., 2, P, C]`` of a drive ``[..., C]``: ``(u, e u)``."""
        u = jnp.broadcast_to(drive[..., None, :], (*drive.shape[:-1], *self.decays.shape[1:]))
        return jnp.stack([u, self.decays[10] * u], axis=-3)

    def zeros(self, batch: int, channels: int) -> jax.Array:
        """The empty state ``[batch, 2, P, C]`` (``channels`` must be ``C``)."""
        if channels != self.decays.shape[2]:
            raise ValueError(
                f"this reduced LDS has {self.decays.shape[2]} channels, not {channels}"
            )
        return jnp.zeros((batch, 2, *self.decays.shape[1:]), self.decays.dtype)

    def read(self, states: jax.Array) -> jax.Array:
        """``states [..., 2, P, C] -> [..., C]``: one pass over the state."""
        weights = self.arithmetic.weights(self.readout)
        return jnp.sum(states[..., 0, :, :] * weights[0] + states[..., 1, :, :] * weights[1], -2)

    def final_state(self, x: jax.Array, x0: Any = None) -> jax.Array:
        """The state ``[B, 2, P, C]`` after ``x [B, T, d_in]`` from ``x0`` (zeros if None), by
        matmuls against the decays' powers (within chunks of :data:`SLOT_CHUNK`, then across):
        ``x = Re S1``, ``y = Im S1 + e Re S2`` with ``S_i = sum_t mu_i^(T-1-t) u_t``."""
        drive = self.drive(x)
        B, T, C = drive.shape
        chunk = min(SLOT_CHUNK, T)
        count = -(-T // chunk)
        drive = jnp.pad(drive, ((0, 0), (count * chunk - T, 0), (0, 0)))
        drive = drive.reshape(B, count, chunk, C).astype(jnp.result_type(drive, jnp.complex64))
        within = self._powers(jnp.arange(chunk - 1, -1, -1)[:, None, None])
        across = self._powers(chunk * jnp.arange(count - 1, -1, -1)[:, None, None])
        s1, s2 = (
            jnp.einsum(
                "bkpc,kpc->bpc",
                jnp.einsum("bktc,tpc->bkpc", drive, w, precision=HIGHEST),
                a,
                precision=HIGHEST,
            )
            for w, a in zip(within, across, strict=True)
        )
        state = jnp.stack([s1.real, s1.imag + self.decays[10] * s2.real], axis=1)
        if x0 is None:
            return state
        return state + self.advance(jnp.asarray(T), x0)

    def free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs ``[B, length, C]`` of ``state [B, 2, P, C]`` with zero inputs:
        ``sum_p Re(mu1^t) wx x + Im(mu1^t) (wy x - wx y) + Re(mu2^t) wy y``."""
        wx, wy = self.arithmetic.weights(self.readout)
        p1, p2 = self._powers(jnp.arange(1, length + 1).reshape(length, 1, 1))
        x, y = state[:, 0], state[:, 1]
        terms = ((p1.real, wx * x), (p1.imag, wy * x - wx * y), (p2.real, wy * y))
        return sum(jnp.einsum("tpc,bpc->btc", p, s, precision=HIGHEST) for p, s in terms)

    def scan(self, kind: str, x: jax.Array, x0: Any = None) -> jax.Array:
        """Every state ``[B, T, 2, P, C]`` of ``x [B, T, d_in]`` from ``x0``, by a sequential
        ``lax.scan`` or an associative scan over (steps, state) segments."""
        drive = jnp.swapaxes(self.drive(x), 0, 1)  # [T, B, C]
        x0 = self.zeros(x.shape[0], self.decays.shape[2]) if x0 is None else x0
        if kind == "sequential":

            def advance(z, u):
                z = self._update(z, u)
                return z, z

            return jnp.swapaxes(jax.lax.scan(advance, x0, drive)[1], 0, 1)
        u = self._inputs(drive)
        u = u.at[0].add(self.advance(jnp.asarray(1), x0))
        counts = jnp.ones((u.shape[0], 1, 1, 1), jnp.int32)

        def combine(left, right):
            return left[0] + right[0], self.advance(right[0], left[1]) + right[1]

        return jnp.swapaxes(jax.lax.associative_scan(combine, (counts, u))[1], 0, 1)

    def _update(self, state: jax.Array, drive: jax.Array) -> jax.Array:
        """``state [B, 2, P, C]`` after one position of ``drive [B, C]``: elementwise over
        planes ``[P, C]``, nothing of the state's size formed besides it."""
        t = self.decays
        x, y, u = state[:, 0], state[:, 1], drive[:, None, :]
        return jnp.stack([t[0] * x - t[1] * y + u, t[1] * x + t[5] * y + t[10] * u], axis=1)

    def step(self, state: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One position: update and readout in one pass over ``state [B, 2, P, C]``."""
        state = self._update(state, self.drive(x_t))
        return state, self.read(state)
