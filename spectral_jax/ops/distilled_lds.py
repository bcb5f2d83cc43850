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

    def step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
        """One position ``x_t [B, d_in]``: (the next state, outputs before AR terms
        ``[B, d_out]``)."""
        u, decays = self.expand(self.drive(x_t))
        state = self.arithmetic.step(decays, state, u)
        return state, self.read(state)
