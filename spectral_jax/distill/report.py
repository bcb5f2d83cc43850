"""Accuracy report of a fitted LDS bank (see :func:`spectral_jax.distill.fit.fit_lds_bank`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds
from spectral_jax.ops import lds_compensated as lc


def _relative(approx: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(approx, np.float64) - target) / np.linalg.norm(target))


def float32_impulse_responses(branch_decays: np.ndarray, coeffs: np.ndarray, length: int):
    """The bank's filters computed by running it in float32 on a unit impulse, step by step
    (the decode path).

    Args:
      branch_decays: ``[S, n]`` float32-representable decays. coeffs: ``[n, K]`` float64.
    Returns:
      ``(plain, compensated)``: ``[length, S * K]`` float32 filters from the plain recurrence and
      readout, and from the compensated (double-float32) ones.
    """
    S, n = branch_decays.shape
    decays = jnp.asarray(branch_decays, jnp.float32)
    impulse = jnp.zeros((1, length, S, n), jnp.float32).at[0, 0].set(1.0)
    weights = lc.split_float64(coeffs)
    plain = jnp.matmul(lds.scan(decays, impulse), weights.hi, precision=jax.lax.Precision.HIGHEST)
    compensated = lc.readout(lc.scan(decays, impulse), weights)
    return plain[0].reshape(length, -1), compensated[0].reshape(length, -1)


def bank_report(
    branch_decays: np.ndarray,
    coeffs: np.ndarray,
    targets: np.ndarray,
    amplification: float,
    condition: float,
) -> dict[str, Any]:
    """Errors of a bank against the exact filters ``targets: [L, S * K]`` (float64).

    Keys: ``num_states``; ``rel_fro_err`` (relative Frobenius error over all ``S * K`` filters)
    and ``max_abs_err`` of the float64 bank; ``coeff_fro_norm`` and ``coeff_max_abs`` of the
    output matrix; ``amplification`` (``||W_normalized||_F / ||Phi||_F``, the factor by which
    cancellation amplifies float32 state round-off); ``condition`` (float64 estimate of the
    condition number of the unit-norm basis; beyond ~1e16 only a lower bound);
    ``rel_fro_err_f32`` and ``rel_fro_err_f32_compensated``: the bank run as a float32
    recurrence on a unit impulse, plain and compensated.
    """
    L = targets.shape[0]
    with jax.enable_x64(True):
        responses = lds.impulse_response(jnp.asarray(branch_decays, jnp.float64), L)
        approx = np.asarray(jnp.einsum("tsn,nk->tsk", responses, jnp.asarray(coeffs)))
    approx = approx.reshape(L, -1)
    plain, compensated = float32_impulse_responses(branch_decays, coeffs, L)
    return {
        "num_states": int(branch_decays.size),
        "rel_fro_err": _relative(approx, targets),
        "max_abs_err": float(np.abs(approx - targets).max()),
        "coeff_fro_norm": float(np.linalg.norm(coeffs)),
        "coeff_max_abs": float(np.abs(coeffs).max()),
        "amplification": float(amplification),
        "condition": float(condition),
        "rel_fro_err_f32": _relative(plain, targets),
        "rel_fro_err_f32_compensated": _relative(compensated, targets),
    }
