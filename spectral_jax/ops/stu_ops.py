"""The Spectral Transform Unit as pure functions.

For inputs ``u: [B, L, d_in]`` and spectral filters ``phi: [L, K]`` the standard STU is

    y_t = sum_k M+_k (phi_k * u)_t + sum_k M-_k (phi~_k * u)_t,   phi~_k[t] = (-1)^t phi_k[t],

(``*`` causal convolution); the Hankel-L variant keeps only the first sum. The tensordot
approximation projects first, ``v = u M_in``, then convolves each of the ``d_out`` channels with
one learned mixture of the filters, ``phi M_filt+`` (and ``phi~ M_filt-``). The optional
autoregressive terms of the original STU add ``sum_{i<k_u} M_u[i] u_{t-i}`` and
``sum_{1<=i<=k_y} M_y[i-1] y_{t-i}``.

Parameter names (the keys of ``params``):
  full:      ``M_plus [K, d_in, d_out]``, ``M_minus [K, d_in, d_out]`` (standard only)
  tensordot: ``M_in [d_in, d_out]``, ``M_filt_plus [K, d_out]``, ``M_filt_minus [K, d_out]``
             (standard only)
  AR terms:  ``M_u [k_u, d_in, d_out]`` (if k_u > 0), ``M_y [k_y, d_out, d_out]`` (if k_y > 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # the projection objects call this module's functions
    from spectral_jax.ops.projection import STUProjection


def alternate_signs(filters: jax.Array) -> jax.Array:
    """``phi~[t] = (-1)^t phi[t]`` for ``filters: [L, K]``."""
    sign = 1 - 2 * (jnp.arange(filters.shape[0]) % 2)
    return filters * sign[:, None].astype(filters.dtype)


def branch_filters(filters: jax.Array, two_branch: bool) -> jax.Array:
    """``[L, K] -> [L, 2K]`` (plus then minus filters) for the standard STU, unchanged otherwise."""
    if not two_branch:
        return filters
    return jnp.concatenate([filters, alternate_signs(filters)], axis=1)


def spectral_weights(params: Mapping[str, jax.Array]) -> jax.Array:
    """Full-mode projections stacked to match :func:`branch_filters`: ``[F, d_in, d_out]``
    (``M_plus``, then ``M_minus`` where the params hold it: the standard variant)."""
    if "M_minus" in params:
        return jnp.concatenate([params["M_plus"], params["M_minus"]], axis=0)
    return params["M_plus"]


def tensordot_kernels(
    params: Mapping[str, jax.Array], filters: jax.Array, two_branch: bool
) -> jax.Array:
    """Per-channel kernels ``[L, d_out]`` of the tensordot mode: ``phi M_filt+ + phi~ M_filt-``."""
    mix = params["M_filt_plus"]
    if two_branch:
        mix = jnp.concatenate([mix, params["M_filt_minus"]], axis=0)
    return branch_filters(filters, two_branch) @ mix.astype(filters.dtype)


def spectral_part(
    params: Mapping[str, jax.Array],
    filters: jax.Array,
    u: jax.Array,
    *,
    two_branch: bool,
    projection: STUProjection,
) -> jax.Array:
    """The convolutional part of the STU (no AR terms).

    Args:
      params: parameter arrays (see module docstring).
      filters: ``[L, K]``, already cut to the input length.
      u: ``[B, L, d_in]``.
      two_branch: the standard variant's two branches (else Hankel-L's one).
      projection: the projection's object (:mod:`spectral_jax.ops.projection`).
    Returns:
      ``[B, L, d_out]`` in ``u``'s dtype.
    """
    kernels = projection.stu_kernels(params, filters, two_branch)
    return projection.convolve(projection.conv_input(params, u), kernels, params)


def input_ar(m_u: jax.Array, u: jax.Array, history: jax.Array | None = None) -> jax.Array:
    """``sum_{i<k_u} M_u[i] u_{t-i}``, with ``history`` (or zeros) before the sequence start.

    Args:
      m_u: ``[k_u, d_in, d_out]``.
      u: ``[B, L, d_in]``.
      history: ``[B, k_u - 1, d_in]`` the inputs before ``u``, most recent first (as kept by
        :func:`most_recent_first`), or None for zeros.
    Returns:
      ``[B, L, d_out]``.
    """
    L, k_u = u.shape[1], m_u.shape[0]
    if history is None:
        padded = jnp.pad(u, ((0, 0), (k_u - 1, 0), (0, 0)))
    else:
        padded = jnp.concatenate([history[:, ::-1].astype(u.dtype), u], axis=1)
    lagged = jnp.stack([padded[:, k_u - 1 - i : k_u - 1 - i + L] for i in range(k_u)], axis=2)
    return jnp.einsum("blid,ido->blo", lagged, m_u.astype(u.dtype))


def output_ar(m_y: jax.Array, drive: jax.Array, history: jax.Array | None = None) -> jax.Array:
    """Solve ``y_t = drive_t + sum_{1<=i<=k_y} M_y[i-1] y_{t-i}`` by a sequential scan over
    time, from the outputs ``history`` before the sequence (zeros if None).

    Args:
      m_y: ``[k_y, d_out, d_out]`` (``y_{t-i} @ M_y[i-1]``).
      drive: ``[B, L, d_out]``.
      history: ``[B, k_y, d_out]`` the previous outputs, most recent first, or None.
    Returns:
      ``[B, L, d_out]``.
    """
    B, _, d_out = drive.shape
    k_y = m_y.shape[0]
    m_y = m_y.astype(drive.dtype)

    def advance(history, x_t):  # history: [B, k_y, d_out], most recent first
        y_t = x_t + jnp.einsum("bio,ioz->bz", history, m_y)
        return jnp.concatenate([y_t[:, None], history[:, : k_y - 1]], axis=1), y_t

    init = jnp.zeros((B, k_y, d_out), drive.dtype) if history is None else history
    _, ys = jax.lax.scan(advance, init.astype(drive.dtype), jnp.swapaxes(drive, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def most_recent_first(sequence: jax.Array, history: jax.Array) -> jax.Array:
    """The newest ``history.shape[1]`` rows of ``history`` followed by ``sequence``, most recent
    first: the lag buffer of the AR terms after feeding ``sequence``.

    Args:
      sequence: ``[B, T, D]`` new rows, oldest first.
      history: ``[B, H, D]`` previous rows, most recent first (zeros before the sequence start).
    Returns:
      ``[B, H, D]`` in ``history``'s dtype.
    """
    keep = history.shape[1]
    if keep == 0:
        return history
    combined = jnp.concatenate([sequence[:, ::-1].astype(history.dtype), history], axis=1)
    return combined[:, :keep]


def ar_step(
    m_u: jax.Array | None,
    m_y: jax.Array | None,
    u_t: jax.Array,
    y_t: jax.Array,
    inputs: jax.Array,
    outputs: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One position of the AR terms: ``y_t + sum_{i<k_u} M_u[i] u_{t-i} +
    sum_{1<=i<=k_y} M_y[i-1] y_{t-i}``, and the lag buffers advanced by one.

    Args:
      m_u: ``[k_u, d_in, d_out]``, or None without input lags.
      m_y: ``[k_y, d_out, d_out]``, or None without output lags.
      u_t: ``[B, d_in]`` this position's input; y_t: ``[B, d_out]`` its spectral output.
      inputs: ``[B, k_u - 1, d_in]`` previous inputs; outputs: ``[B, k_y, d_out]`` previous
        outputs (both most recent first, as kept by :func:`most_recent_first`).
    Returns:
      ``(y_t [B, d_out], inputs, outputs)`` with the buffers now ending at position ``t``.
    """
    if m_u is not None:
        lagged = jnp.concatenate([u_t[:, None], inputs], axis=1)  # u_t, u_{t-1}, ...
        y_t = y_t + jnp.einsum(
            "bid,ido->bo", lagged, m_u.astype(u_t.dtype), precision=jax.lax.Precision.HIGHEST
        )
        inputs = lagged[:, : inputs.shape[1]]
    if m_y is not None:
        y_t = y_t + jnp.einsum(
            "bio,ioz->bz", outputs, m_y.astype(y_t.dtype), precision=jax.lax.Precision.HIGHEST
        )
        outputs = most_recent_first(y_t[:, None], outputs)
    return y_t, inputs, outputs


def stu_apply(
    params: Mapping[str, jax.Array],
    filters: jax.Array,
    u: jax.Array,
    *,
    two_branch: bool,
    projection: STUProjection,
) -> jax.Array:
    """Full STU forward pass: spectral part plus the AR terms present in ``params``.

    Args:
      params: parameter arrays (see module docstring).
      filters: ``[L, K]`` for the input length ``L``.
      u: ``[B, L, d_in]``.
      two_branch, projection: as in :func:`spectral_part`.
    Returns:
      ``[B, L, d_out]`` in ``u``'s dtype.
    """
    y = spectral_part(params, filters, u, two_branch=two_branch, projection=projection)
    if "M_u" in params:
        y = y + input_ar(params["M_u"], u)
    if "M_y" in params:
        y = output_ar(params["M_y"], y)
    return y
