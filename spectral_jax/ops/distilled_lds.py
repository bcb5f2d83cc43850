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
# ``[chunk, C, m]``).
SLOT_CHUNK = 512


def slot_decays(table: jax.Array) -> jax.Array:
    """The complex decays ``[C, m]`` of a reduced layer's ``table [C, m, 5]``."""
    return jax.lax.complex(table[..., 0], table[..., 1])


def slot_powers(table: jax.Array, n: jax.Array) -> jax.Array:
    """``decay^n`` (complex) for integer ``n >= 0`` broadcastable against ``[C, m]``, as
    ``sign^n exp(n log|decay|) (cos + i sin)(n phi)`` from the float64-derived table (phase
    error ``~n eps |phi|``, ``|phi| <= pi / 2``)."""
    odd = (n % 2 == 1) & (table[..., 4] < 0)
    n = n.astype(table.dtype)
    magnitude = jnp.where(odd, -1.0, 1.0) * jnp.exp(n * table[..., 2])
    phase = n * table[..., 3]
    return jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))


@dataclasses.dataclass(frozen=True, eq=False)
class ReducedLDS(DistilledLDS):
    """A tensordot layer's LDS reduced per channel (:mod:`spectral_jax.distill.reduce`): every
    channel ``c`` has ``m`` complex slots ``z' = decay[c, m] z + drive[c]`` read out as
    ``y[c] = Re(sum_m readout[c, m] z[m])``. Plain arithmetic only.

    Attributes (beyond :class:`DistilledLDS`'s): ``decays`` is the table ``[C, m, 5]`` (real
    part, imaginary part, ``log|decay|``, ``phi``, ``sign``); ``readout`` is ``[1, C, m, 2]``
    (real and imaginary parts). States are complex ``[B, C, m]``; a padded slot (decay 0,
    readout 0) holds only the last drive and is never read.
    """

    def _readout(self) -> jax.Array:
        weights = self.arithmetic.weights(self.readout)
        return jax.lax.complex(weights[..., 0], weights[..., 1])

    def zeros(self, batch: int, channels: int) -> jax.Array:
        """The empty state ``[batch, C, m]`` (``channels`` must be ``C``)."""
        if channels != self.decays.shape[0]:
            raise ValueError(
                f"this reduced LDS has {self.decays.shape[0]} channels, not {channels}"
            )
        dtype = slot_decays(self.decays).dtype
        return jnp.zeros((batch, *self.decays.shape[:2]), dtype)

    def read(self, states: jax.Array) -> jax.Array:
        """``states [..., C, m] -> [..., C]``: one pass over the state."""
        weights = self.arithmetic.weights(self.readout)
        return jnp.sum(states.real * weights[..., 0] - states.imag * weights[..., 1], axis=-1)

    def final_state(self, x: jax.Array, x0: Any = None) -> jax.Array:
        """The state ``[B, C, m]`` after ``x [B, T, d_in]`` from ``x0`` (zeros if None), by
        matmuls against slot powers (within chunks of :data:`SLOT_CHUNK`, then across)."""
        drive = self.drive(x)
        B, T, C = drive.shape
        chunk = min(SLOT_CHUNK, T)
        count = -(-T // chunk)
        drive = jnp.pad(drive, ((0, 0), (count * chunk - T, 0), (0, 0)))
        drive = drive.reshape(B, count, chunk, C).astype(slot_decays(self.decays).dtype)
        within = slot_powers(self.decays, jnp.arange(chunk - 1, -1, -1)[:, None, None])
        local = jnp.einsum("bktc,tcm->bkcm", drive, within, precision=HIGHEST)
        across = slot_powers(self.decays, chunk * jnp.arange(count - 1, -1, -1)[:, None, None])
        state = jnp.einsum("bkcm,kcm->bcm", local, across, precision=HIGHEST)
        if x0 is None:
            return state
        return state + slot_powers(self.decays, jnp.asarray(T)) * x0

    def free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs ``[B, length, C]`` of ``state [B, C, m]`` with zero inputs."""
        t = jnp.arange(1, length + 1).reshape(length, 1, 1)
        folded = state * self._readout()
        out = jnp.einsum("tcm,bcm->btc", slot_powers(self.decays, t), folded, precision=HIGHEST)
        return out.real

    def scan(self, kind: str, x: jax.Array, x0: Any = None) -> jax.Array:
        """Every state ``[B, T, C, m]`` of ``x [B, T, d_in]`` from ``x0``, by a sequential
        ``lax.scan`` or an associative scan over (steps, state) segments."""
        decays = slot_decays(self.decays)
        drive = jnp.swapaxes(self.drive(x), 0, 1)[..., None].astype(decays.dtype)  # [T,B,C,1]
        x0 = self.zeros(x.shape[0], self.decays.shape[0]) if x0 is None else x0
        if kind == "sequential":

            def advance(z, u):
                z = decays * z + u
                return z, z

            return jnp.swapaxes(jax.lax.scan(advance, x0, drive)[1], 0, 1)
        u = jnp.broadcast_to(drive, (*drive.shape[:-1], decays.shape[-1])).at[0].add(decays * x0)
        counts = jnp.ones((u.shape[0], 1, 1, 1), jnp.int32)

        def combine(left, right):
            n2, b2 = right
            return left[0] + n2, slot_powers(self.decays, n2) * left[1] + b2

        return jnp.swapaxes(jax.lax.associative_scan(combine, (counts, u))[1], 0, 1)

    def step(self, state: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One position: update and readout in one pass over ``state [B, C, m]``."""
        state = slot_decays(self.decays) * state + self.drive(x_t)[..., None]
        return state, self.read(state)
