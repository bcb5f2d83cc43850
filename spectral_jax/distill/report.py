"""Accuracy report of a fitted LDS bank (see :func:`spectral_jax.distill.fit.fit_lds_bank`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds
from spectral_jax.ops.lds_arithmetic import LDSArithmetic


def _relative(approx: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(approx, np.float64) - target) / np.linalg.norm(target))


def float32_impulse_responses(
    arithmetic: LDSArithmetic, branch_decays: np.ndarray, coeffs: np.ndarray, length: int
) -> jax.Array:
    """The bank's filters computed by running it in float32 in ``arithmetic`` on a unit impulse,
    step by step (the decode path: the arithmetic's own sequential scan and readout).

    Args:
      arithmetic: the arithmetic the bank runs in (:mod:`spectral_jax.ops.lds_arithmetic`).
      branch_decays: ``[S, n]`` float32-representable decays. coeffs: ``[n, K]`` float64.
    Returns:
      ``[length, S * K]`` float32 filters.
    """
    S, n = branch_decays.shape
    decays = jnp.asarray(branch_decays, jnp.float32)
    impulse = jnp.zeros((1, length, S, n), jnp.float32).at[0, 0].set(1.0)
    weights = arithmetic.weights(jnp.asarray(arithmetic.pack(coeffs, np.float32)))
    filters = arithmetic.readout(arithmetic.scan("sequential", decays, impulse), weights)
    return filters[0].reshape(length, -1)


def bank_report(
    arithmetic: LDSArithmetic,
    branch_decays: np.ndarray,
    coeffs: np.ndarray,
    targets: np.ndarray,
    amplification: float,
    condition: float,
) -> dict[str, Any]:
    """Errors of a bank meant to run in ``arithmetic`` against the exact filters
    ``targets: [L, S * K]`` (float64).

    Keys: ``num_states``; ``rel_fro_err`` (relative Frobenius error over all ``S * K`` filters)
    and ``max_abs_err`` of the float64 bank; ``coeff_fro_norm`` and ``coeff_max_abs`` of the
    output matrix; ``amplification`` (``||W_normalized||_F / ||Phi||_F``, the factor by which
    cancellation amplifies float32 state round-off); ``condition`` (float64 estimate of the
    condition number of the unit-norm basis; beyond ~1e16 only a lower bound); and the
    arithmetic's ``report_key`` (``rel_fro_err_f32`` for plain, ``rel_fro_err_f32_compensated``
    for compensated): the bank run as a float32 recurrence in that arithmetic on a unit impulse.
    """
    L = targets.shape[0]
    with jax.enable_x64(True):
        responses = lds.impulse_response(jnp.asarray(branch_decays, jnp.float64), L)
        approx = np.asarray(jnp.einsum("tsn,nk->tsk", responses, jnp.asarray(coeffs)))
    approx = approx.reshape(L, -1)
    float32 = float32_impulse_responses(arithmetic, branch_decays, coeffs, L)
    return {
        "num_states": int(branch_decays.size),
        "rel_fro_err": _relative(approx, targets),
        "max_abs_err": float(np.abs(approx - targets).max()),
        "coeff_fro_norm": float(np.linalg.norm(coeffs)),
        "coeff_max_abs": float(np.abs(coeffs).max()),
        "amplification": float(amplification),
        "condition": float(condition),
        arithmetic.report_key: _relative(float32, targets),
    }


def reduction_lines(banks: list[dict[str, Any]]) -> list[str]:
    """One line per distilled layer of :func:`~spectral_jax.nn.distillation.distill_model`'s
    bank reports: real states per channel (min/mean/max), the channel groups and the state
    floats per sequence after their padding, the balanced-truncation bound and the measured
    kernel error (largest over the channels), or that the layer keeps the bank's shared
    states."""
    lines = [
        f"{'layer':<28}{'states min/mean/max':>21}{'groups':>7}{'state floats':>14}"
        f"{'bound':>10}{'kernel err':>12}"
    ]
    for bank in banks:
        for layer in bank["reduction"]:
            if not layer["blocks"]:
                lines.append(f"{layer['path']:<28}  not reduced: the bank's {bank['num_states']}")
                continue
            states = f"{layer['states_min']}/{layer['states_mean']:.1f}/{layer['states_max']}"
            lines.append(
                f"{layer['path']:<28}{states:>21}{layer['groups']:>7}{layer['state_floats']:>14,}"
                f"{layer['bound_max']:>10.2e}{layer['error_max']:>12.2e}"
            )
    return lines
