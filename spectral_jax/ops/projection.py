"""The two STU projections (:data:`spectral_jax.validation.Projection`) as one small object each.

A config stores the projection's name; layers look its object up in
:data:`PROJECTIONS_BY_NAME` and call the same methods whichever it is, so no layer branches on
the projection:

* ``full``: the conv inputs are the layer inputs (``C = d_in``), convolved with the ``F = S * K``
  filters and then projected by ``M_plus`` (and ``M_minus``), ``[F, d_in, d_out]``: the
  *projected* contraction. Its distilled LDS reads the filter outputs out with the bank's
  ``coeffs`` and projects them alike.
* ``tensordot``: the inputs are projected first by ``M_in [d_in, d_out]`` (``C = d_out``), and
  each channel is convolved with its own learned filter mixture ``phi M_filt``: the
  *channelwise* contraction. Its LDS folds each channel's mixture into the bank's coefficients,
  one readout ``[d_out, S, n]``.

``params`` below are a layer's learned arrays by name (:mod:`spectral_jax.ops.stu_ops`); each
object reads the names it needs. Shapes: conv inputs ``h: [B, T, C]``, kernels ``[L, F]``
(``F = C`` channelwise), LDS states ``[..., C, S, n]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import stu_ops
from spectral_jax.ops.conv import causal_conv, causal_conv_project
from spectral_jax.validation import Projection

HIGHEST = jax.lax.Precision.HIGHEST
Params = Mapping[str, Any]


def _branch_names(two_branch: bool) -> tuple[str, ...]:
    return ("plus", "minus") if two_branch else ("plus",)


@dataclasses.dataclass(frozen=True)
class FullProjection:
    """Convolve the inputs with every filter, then project: ``M: [F, d_in, d_out]``."""

    name: ClassVar[Projection] = "full"

    def stu_params(self, K: int, d_in: int, d_out: int, two_branch: bool) -> dict[str, tuple]:
        """The STU's spectral parameters: ``{name: (shape, fan_in)}`` in initialisation order."""
        return {f"M_{b}": ((K, d_in, d_out), d_in) for b in _branch_names(two_branch)}

    def lds_param_shapes(self, K: int, d_in: int, d_out: int, two_branch: bool) -> dict:
        """The distilled layer's spectral parameters by name: the STU's projections."""
        return {f"M_{b}": (K, d_in, d_out) for b in _branch_names(two_branch)}

    def channels(self, d_in: int, d_out: int) -> int:
        """``C``, the channels of the convolution (and of the LDS): ``d_in``."""
        return d_in

    def conv_input(self, params: Params, u: jax.Array, precision=None) -> jax.Array:
        """Conv inputs ``[..., C]`` from layer inputs ``u [..., d_in]``: ``u`` itself."""
        return u

    def stu_kernels(self, params: Params, filters: jax.Array, two_branch: bool) -> jax.Array:
        """Conv taps ``[L, F]`` from the filters ``[L, K]``: both branches' filters."""
        return stu_ops.branch_filters(filters, two_branch)

    def output_weights(self, params: Params) -> jax.Array:
        """The projection ``[F, d_in, d_out]`` after the convolution."""
        return stu_ops.spectral_weights(params)

    def convolve(self, h: jax.Array, kernels: jax.Array, params: Params) -> jax.Array:
        """``h [B, T, C]`` by FFT with ``kernels [>= T, F]``, projected: ``[B, T, d_out]``."""
        return causal_conv_project(h, kernels, self.output_weights(params))

    # ---- the contraction of a decode cache (spectral_jax.ops.conv_decode) -------------------

    def check_contraction(self, kernels: jax.Array, params: Params, channels: int) -> None:
        weights = self.output_weights(params)
        if weights.shape[:2] != (kernels.shape[1], channels):
            raise ValueError(
                f"weights must be [F={kernels.shape[1]}, C={channels}, O], got {weights.shape}"
            )

    def out_features(self, params: Params, channels: int) -> int:
        """``O``, the features of the contracted output."""
        return self.output_weights(params).shape[2]

    def window_features(self, window: jax.Array, hist: jax.Array) -> jax.Array:
        """``sum_s K[t-s, f] h_s[c]`` over a window: taps ``[w, F]``, history ``[w, B, C]`` ->
        ``[F, B, C]`` (projected later, once per token, by :meth:`project`)."""
        w, batch, channels = hist.shape
        return (window.T @ hist.reshape(w, batch * channels)).reshape(-1, batch, channels)

    def features_shape(self, num_taps: int, batch: int, channels: int) -> tuple[int, ...]:
        return (num_taps, batch, channels)

    def project(self, z: jax.Array, params: Params) -> jax.Array:
        """Window features ``[F, B, C] -> [B, O]``."""
        return jnp.einsum("fbc,fco->bo", z, self.output_weights(params).astype(z.dtype))

    # ---- the distilled LDS ------------------------------------------------------------------

    def lds_from_stu(self, arrays: dict[str, np.ndarray], coeffs: np.ndarray) -> dict:
        """Distilled-layer spectral parameters from the STU's: the projections, unchanged (the
        LDS replaces only the convolutions; its readout is the bank's ``coeffs``)."""
        K = coeffs.shape[1]
        names = [name for name in ("M_plus", "M_minus") if name in arrays]
        for name in names:
            if arrays[name].ndim != 3 or arrays[name].shape[0] != K:
                raise ValueError(f"{name} must be [K={K}, d_in, d_out], got {arrays[name].shape}")
        return {name: arrays[name] for name in names}

    def stu_names(self, two_branch: bool) -> list[str]:
        """The STU parameters a conversion needs."""
        return [f"M_{b}" for b in _branch_names(two_branch)]

    def lds_fixed(self, responses: np.ndarray, coeffs: np.ndarray, params: Params) -> tuple:
        """Host-side float64 ``(readout weights [n, K], kernels [L, S * K])`` of the LDS, from the
        bank's responses ``[L, S, n]`` and ``coeffs [n, K]``: the bank's filters."""
        kernels = np.einsum("tsn,nk->tsk", responses, coeffs)
        return coeffs, kernels.reshape(kernels.shape[0], -1)

    def lds_read(self, arithmetic, states: Any, weights: Any, params: Params) -> jax.Array:
        """Outputs before AR terms ``[..., d_out]`` of ``states [..., d_in, S, n]``: the filter
        outputs ``[..., d_in, S, K]`` read out in ``arithmetic``, then projected."""
        lead = jax.tree.leaves(states)[0].shape[:-3]
        features = arithmetic.readout(states, weights)  # [..., C, S, K]
        features = features.reshape(*lead, features.shape[-3], -1)
        return jnp.einsum(
            "...cf,fco->...o", features, self.output_weights(params), precision=HIGHEST
        )

    def free_response(
        self, decay_powers: jax.Array, state: jax.Array, weights: jax.Array, params: Params
    ) -> jax.Array:
        """Outputs ``[B, T, d_out]`` of a plain ``state [B, d_in, S, n]`` with zero inputs, from
        ``decay_powers [T, S, n]`` (``a^(t+1)``): readout and projection folded into the state
        first, so nothing of size ``T x states`` is formed but the powers."""
        weights_out = self.output_weights(params)  # [S * K, d_in, d_out]
        projections = weights_out.reshape(decay_powers.shape[1], -1, *weights_out.shape[1:])
        folded = jnp.einsum("bcsn,nk,skco->bsno", state, weights, projections, precision=HIGHEST)
        return jnp.einsum("tsn,bsno->bto", decay_powers, folded, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class TensordotProjection:
    """Project first (``M_in``), then one learned filter mixture per channel (``M_filt``)."""

    name: ClassVar[Projection] = "tensordot"

    def stu_params(self, K: int, d_in: int, d_out: int, two_branch: bool) -> dict[str, tuple]:
        """The STU's spectral parameters: ``{name: (shape, fan_in)}`` in initialisation order."""
        mixes = {f"M_filt_{b}": ((K, d_out), K) for b in _branch_names(two_branch)}
        return {"M_in": ((d_in, d_out), d_in), **mixes}

    def lds_param_shapes(self, K: int, d_in: int, d_out: int, two_branch: bool) -> dict:
        """The distilled layer's spectral parameters by name: ``M_in`` (the mixtures are folded
        into its readout)."""
        return {"M_in": (d_in, d_out)}

    def channels(self, d_in: int, d_out: int) -> int:
        """``C``, the channels of the convolution (and of the LDS): ``d_out``."""
        return d_out

    def conv_input(self, params: Params, u: jax.Array, precision=None) -> jax.Array:
        """Conv inputs ``[..., d_out]`` from layer inputs ``u [..., d_in]``: ``u M_in``."""
        return jnp.matmul(u, params["M_in"].astype(u.dtype), precision=precision)

    def stu_kernels(self, params: Params, filters: jax.Array, two_branch: bool) -> jax.Array:
        """Conv taps ``[L, d_out]``: each channel's filter mixture."""
        return stu_ops.tensordot_kernels(params, filters, two_branch)

    def convolve(self, h: jax.Array, kernels: jax.Array, params: Params) -> jax.Array:
        """``h [B, T, C]`` by FFT with ``kernels [>= T, C]``, channel by channel."""
        return causal_conv(h, kernels)

    # ---- the contraction of a decode cache (spectral_jax.ops.conv_decode) -------------------

    def check_contraction(self, kernels: jax.Array, params: Params, channels: int) -> None:
        if kernels.shape[1] != channels:
            raise ValueError(
                f"channelwise kernels need one tap per channel: {kernels.shape[1]} != {channels}"
            )

    def out_features(self, params: Params, channels: int) -> int:
        return channels

    def window_features(self, window: jax.Array, hist: jax.Array) -> jax.Array:
        """``sum_s K[t-s, c] h_s[c]`` over a window: taps ``[w, C]``, history ``[w, B, C]`` ->
        ``[B, C]``."""
        w, batch, channels = hist.shape
        # a product with a ones row: XLA:CPU reduces a leading axis far slower than it multiplies
        ones = jnp.ones((1, w), window.dtype)
        return (ones @ (window[:, None, :] * hist).reshape(w, -1)).reshape(batch, channels)

    def features_shape(self, num_taps: int, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels)

    def project(self, z: jax.Array, params: Params) -> jax.Array:
        """Channelwise sums are the outputs: ``[B, C]`` unchanged."""
        return z

    # ---- the distilled LDS ------------------------------------------------------------------

    def lds_from_stu(self, arrays: dict[str, np.ndarray], coeffs: np.ndarray) -> dict:
        """Distilled-layer parameters from the STU's: ``M_in``, and each channel's mixture folded
        into the bank, ``readout[o, s, j] = sum_k coeffs[j, k] M_filt_s[k, o]`` (float64,
        ``[d_out, S, n]``)."""
        K = coeffs.shape[1]
        names = [name for name in ("M_filt_plus", "M_filt_minus") if name in arrays]
        for name in names:
            if arrays[name].ndim != 2 or arrays[name].shape[0] != K:
                raise ValueError(f"{name} must be [K={K}, d_out], got {arrays[name].shape}")
        readout = [coeffs @ arrays[name].astype(np.float64) for name in names]  # S x [n, d_out]
        return {"M_in": arrays["M_in"], "readout": np.stack(readout).transpose(2, 0, 1)}

    def stu_names(self, two_branch: bool) -> list[str]:
        """The STU parameters a conversion needs."""
        return ["M_in"] + [f"M_filt_{b}" for b in _branch_names(two_branch)]

    def lds_fixed(self, responses: np.ndarray, coeffs: np.ndarray, params: Params) -> tuple:
        """Host-side float64 ``(readout weights [d_out, S * n, 1], kernels [L, d_out])`` from the
        bank's responses ``[L, S, n]`` and the folded ``params["readout"] [d_out, S, n]``
        (``d_out`` from ``params["M_in"] [d_in, d_out]``)."""
        readout = np.asarray(params["readout"], np.float64)
        expected = (np.shape(params["M_in"])[1], *responses.shape[1:])
        if readout.shape != expected:
            raise ValueError(f"readout must have shape {expected}, got {readout.shape}")
        kernels = np.einsum("tsn,osn->to", responses, readout)
        return readout.reshape(readout.shape[0], -1, 1), kernels

    def lds_read(self, arithmetic, states: Any, weights: Any, params: Params) -> jax.Array:
        """Outputs before AR terms ``[..., d_out]`` of ``states [..., d_out, S, n]``: each
        channel's states read out with its own folded coefficients, in ``arithmetic``."""
        lead = jax.tree.leaves(states)[0].shape[:-3]
        channels = jax.tree.leaves(states)[0].shape[-3]
        flat = jax.tree.map(lambda s: s.reshape(*lead, channels, -1), states)
        return arithmetic.channel_readout(flat, jax.tree.map(lambda w: w[..., 0], weights))

    def free_response(
        self, decay_powers: jax.Array, state: jax.Array, weights: jax.Array, params: Params
    ) -> jax.Array:
        """Outputs ``[B, T, d_out]`` of a plain ``state [B, d_out, S, n]`` with zero inputs, from
        ``decay_powers [T, S, n]`` (``a^(t+1)``), each channel's readout folded in first."""
        folded = state * weights.reshape(state.shape[1:])  # [B, d_out, S, n]
        return jnp.einsum("tsn,bosn->bto", decay_powers, folded, precision=HIGHEST)


STUProjection = FullProjection | TensordotProjection
PROJECTIONS_BY_NAME: dict[str, STUProjection] = {
    p.name: p for p in (FullProjection(), TensordotProjection())
}
