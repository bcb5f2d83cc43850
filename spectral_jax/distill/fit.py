"""SpectraLDS distillation: fit the spectral filters with a bank of scalar LDS impulse responses.

The Hankel matrix is a continuous mixture of LDS impulse responses
(:mod:`spectral_jax.ops.filters`), so each filter is, to float64 round-off, a combination of
``a^t`` over a few dozen decays ``a``:

    phi_k[t] ~= sum_j W[j, k] a_j^t,       and then   (-1)^t phi_k[t] = sum_j W[j, k] (-a_j)^t.

The alternating-sign filters of the standard STU therefore reuse the *same* coefficients with
negated decays: one least-squares fit of ``K`` columns serves all ``2K`` filters, and a bank with
``n`` decays has ``2n`` states per input channel. Hankel-L filters live in the span of the
responses of both ``+a_j`` and ``-a_j`` (its mixture runs over ``a`` in (-1, 1)), so its single
branch uses the signed decays ``[a, -a]``.

The fit (x64 scoped to it, JAX linear algebra, deterministic):

* decays on a uniform grid in ``x = log(-log a)`` (the quadrature variable of the mixture),
  ``x_j in [-log L + offset, x_max]``, each rounded to the nearest float32 *before* the fit, so a
  float32 recurrence runs exactly the fitted system;
* columns ``a_j^t`` scaled to unit norm, and a Tikhonov-regularised least squares in that basis
  (``ridge`` times the largest singular value): it keeps the coefficients of this extremely
  ill-conditioned basis (condition numbers ~1e17 and beyond) at the minimal size that still
  reaches the float64 floor;
* the grid end points are chosen among a few candidates by the smallest predicted error
  ``fit_error + roundoff * amplification`` of the arithmetic the bank will run in, where
  ``amplification = ||W_normalized||_F / ||Phi||_F`` is the factor by which the cancelling
  coefficients amplify round-off of the states, and ``roundoff`` is the arithmetic's own
  (:mod:`spectral_jax.ops.lds_arithmetic`: ``2^-24`` for plain float32, ``2^-48`` for
  compensated float32 pairs).

Banks are saved pickle-free (``.npz`` with a JSON metadata string) and cached on disk like the
filters (:mod:`spectral_jax.ops.disk_cache`). The fit report lives in
:mod:`spectral_jax.distill.report`; the bank itself in :mod:`spectral_jax.distill.bank`.
"""

import dataclasses
import itertools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.distill import report as distill_report
from spectral_jax.distill.bank import LDSBank, bank_from_arrays
from spectral_jax.ops import lds
from spectral_jax.ops.disk_cache import cached_arrays
from spectral_jax.ops.filters import max_num_filters, spectral_filters
from spectral_jax.ops.lds_arithmetic import ARITHMETICS_BY_NAME
from spectral_jax.validation import (
    ARITHMETICS,
    VARIANTS,
    Arithmetic,
    finite_float,
    int_in_range,
    one_of,
    positive_int,
)

# Bump when the fit or its stored report changes so stale cache files are never read (3: the
# report holds only the float32 error of the bank's own arithmetic).
ALGORITHM_VERSION = 3
DEFAULT_NUM_STATES = 120
DEFAULT_RIDGE = 1e-12
# Candidate grids: x_min = -log(L) + offset, x_max (see the module docstring).
X_MIN_OFFSETS = (0.0, 0.5, 1.0, 1.5)
X_MAX_CANDIDATES = (1.5, 2.0)
# Further ridges tried (with the given one) by the tail-penalised or capped fits.
TAIL_RIDGES = (1e-10, 1e-8, 1e-6)


def target_filters(L: int, K: int, variant: str) -> np.ndarray:
    """The exact filters a bank approximates: ``[L, S * K]`` (``phi`` then ``(-1)^t phi``)."""
    phi, _ = spectral_filters(L, K, variant)
    if variant != "standard":
        return np.asarray(phi)
    sign = np.where(np.arange(L) % 2 == 0, 1.0, -1.0)[:, None]
    return np.concatenate([phi, sign * phi], axis=1)


def grid_decays(L: int, num_nodes: int, x_min: float, x_max: float) -> np.ndarray:
    """``num_nodes`` decays ``exp(-exp(x))`` for ``x`` uniform in ``[x_min, x_max]``, rounded to
    float32 (returned as float64), increasing in ``x`` (decreasing in ``a``)."""
    x = np.linspace(x_min, x_max, num_nodes)
    decays = np.exp(-np.exp(x)).astype(np.float32).astype(np.float64)
    if np.unique(decays).size != num_nodes or np.any(decays <= 0) or np.any(decays >= 1):
        raise ValueError(
            f"{num_nodes} decays on x in [{x_min}, {x_max}] collide after rounding to float32 "
            f"(L={L}); use fewer states or a narrower grid"
        )
    return decays


def _signed(decays: np.ndarray, variant: str) -> np.ndarray:
    return np.concatenate([decays, -decays]) if variant == "hankel_l" else decays


@jax.jit
def solve_coefficients(signed_decays: jax.Array, phi: jax.Array, ridge: float, weights=None):
    """Regularised least squares of ``phi: [T, K]`` over the responses ``a_j^t`` of
    ``signed_decays: [n]``, in the unit-norm basis (pass float64 arrays under ``enable_x64``).
    ``weights: [T]`` (or None: ones) weigh the rows (the tail-penalised fit's zero-target rows
    past ``L``).

    Returns ``(coeffs [n, K], relative residual, amplification, condition estimate)``.
    """
    responses = lds.impulse_response(signed_decays, phi.shape[0])  # [T, n]
    if weights is not None:
        responses, phi = responses * weights[:, None], phi * weights[:, None]
    norms = jnp.linalg.norm(responses, axis=0)
    basis = responses / norms
    # One QR of [basis | phi] gives R and Q^T phi without forming Q.
    n = basis.shape[1]
    r_aug = jnp.linalg.qr(jnp.concatenate([basis, phi], axis=1), mode="r")
    u, s, vt = jnp.linalg.svd(r_aug[:n, :n])
    lam = ridge * s[0]
    w_normalized = vt.T @ ((s / (s**2 + lam**2))[:, None] * (u.T @ r_aug[:n, n:]))
    residual = basis @ w_normalized - phi
    phi_norm = jnp.linalg.norm(phi)
    return (
        w_normalized / norms[:, None],
        jnp.linalg.norm(residual) / phi_norm,
        jnp.linalg.norm(w_normalized) / phi_norm,
        s[0] / s[-1],
    )


@dataclasses.dataclass(frozen=True)
class TailOptions:
    """Bank-side horizon options of :func:`fit_lds_bank` (defaults: off).

    weight: the tail-penalised fit: zero-target rows for ``t in [L, multiple * L)``, weighted by
      ``weight`` against the in-window rows (0: no such rows).
    multiple: where those rows end, in training lengths (>= 2).
    cap: the eigenvalue cap: every decay has ``|a|^L <= cap`` (``0 < cap < 1``; the grid starts
      at ``x = log(-log(cap) / L)`` or later), or None for no cap.
    """

    weight: float = 0.0
    multiple: int = 9
    cap: float | None = None

    def __post_init__(self) -> None:
        finite_float("TailOptions", "weight", self.weight)
        positive_int("TailOptions", "multiple", self.multiple, minimum=2)
        if self.cap is not None and not (
            isinstance(self.cap, float | int) and 0.0 < self.cap < 1.0
        ):
            raise ValueError(
                f"TailOptions.cap must be in (0, 1) (the bound on a^L), got {self.cap!r}"
            )

    @property
    def active(self) -> bool:
        return self.weight > 0 or self.cap is not None

    def name(self) -> str:
        """The cache-file suffix ("" when off, so the default fit keeps its files)."""
        parts = [f"-tail{self.weight:.3g}x{self.multiple}"] if self.weight > 0 else []
        parts += [f"-cap{self.cap:.3g}"] if self.cap is not None else []
        return "".join(parts)

    def x_floor(self, L: int) -> float:
        """The smallest grid ``x`` the cap allows (``-inf`` without a cap)."""
        return -np.inf if self.cap is None else float(np.log(-np.log(self.cap) / L))


NO_TAIL = TailOptions()


def _check_fit_args(L, K, variant, num_states, ridge, x_range, arithmetic) -> None:
    one_of("fit_lds_bank", "arithmetic", arithmetic, ARITHMETICS)
    one_of("fit_lds_bank", "variant", variant, VARIANTS)
    L = positive_int("fit_lds_bank", "L", L, minimum=2)
    limit = min(max_num_filters(L, variant), L - 1)
    int_in_range("fit_lds_bank", "K", K, 1, limit, f"(K < L) for L={L}")
    if int_in_range("fit_lds_bank", "num_states", num_states, 4, L, "(both signs counted)") % 2:
        raise ValueError(
            f"fit_lds_bank.num_states must be even (both signs counted), got {num_states!r}"
        )
    finite_float("fit_lds_bank", "ridge", ridge)
    if ridge >= 1:
        raise ValueError(f"fit_lds_bank.ridge must be in [0, 1), got {ridge!r}")
    if x_range is not None and not (
        len(x_range) == 2 and all(np.isfinite(x_range)) and x_range[0] < x_range[1]
    ):
        raise ValueError(f"x_range must be (x_min, x_max) with x_min < x_max, got {x_range!r}")


def _fit(
    L: int, K: int, variant: str, num_states: int, ridge: float, x_range, arithmetic: str,
    tail: TailOptions,
) -> dict:  # fmt: skip
    """The uncached fit: arrays and metadata for the cache (see :func:`fit_lds_bank`)."""
    with jax.default_device(jax.devices("cpu")[0]):
        return _fit_on_host(L, K, variant, num_states, ridge, x_range, arithmetic, tail)


def _fit_on_host(
    L: int, K: int, variant: str, num_states: int, ridge: float, x_range, arithmetic: str,
    tail: TailOptions,
) -> dict:  # fmt: skip
    start = time.perf_counter()
    phi = np.asarray(spectral_filters(L, K, variant)[0])
    num_nodes = num_states // 2
    if x_range is None:
        candidates = [(-np.log(L) + o, x) for o in X_MIN_OFFSETS for x in X_MAX_CANDIDATES]
    else:
        candidates = [tuple(float(v) for v in x_range)]
    floor = tail.x_floor(L)
    candidates = sorted({(max(lo, floor), hi) for lo, hi in candidates if hi > floor})
    if not candidates:
        raise ValueError(f"the cap a^L <= {tail.cap} leaves no grid below x_max (L={L})")
    rows = tail.multiple * L if tail.weight > 0 else L
    weights = np.where(np.arange(rows) < L, 1.0, tail.weight)
    target = np.concatenate([phi, np.zeros((rows - L, phi.shape[1]))])
    lds_arithmetic = ARITHMETICS_BY_NAME[arithmetic]
    best = None
    with jax.enable_x64(True):
        phi_j = jnp.asarray(target, jnp.float64)
        weights_j = jnp.asarray(weights, jnp.float64) if tail.weight > 0 else None
        # a bounded tail needs larger coefficients: let the ridge trade them for accuracy too
        ridges = sorted({float(ridge), *(TAIL_RIDGES if tail.active else ())})
        for (x_min, x_max), lam in itertools.product(candidates, ridges):
            decays = grid_decays(L, num_nodes, x_min, x_max)
            signed = jnp.asarray(_signed(decays, variant), jnp.float64)
            coeffs, err, amp, cond = (
                np.asarray(v) for v in solve_coefficients(signed, phi_j, lam, weights_j)
            )
            score = float(err) + lds_arithmetic.roundoff * float(amp)
            if np.isfinite(score) and (best is None or score < best[0]):
                best = (score, decays, coeffs, (x_min, x_max), float(amp), float(cond), lam)
    if best is None:
        raise ValueError(f"the fit failed (non-finite residuals) for L={L}, K={K}, {variant}")
    _, decays, coeffs, (x_min, x_max), amp, cond, ridge = best
    bank = LDSBank(_signed(decays, variant), coeffs, L, variant)
    report = distill_report.bank_report(
        lds_arithmetic, bank.branch_decays(), coeffs, target_filters(L, K, variant), amp, cond
    )
    fit_seconds = time.perf_counter() - start
    metadata = {
        "version": ALGORITHM_VERSION,
        "num_states": num_states,
        "ridge": float(ridge),
        "x_min": float(x_min),
        "x_max": float(x_max),
        "arithmetic": arithmetic,
        "tail": dataclasses.asdict(tail),
        "report": {**report, "fit_seconds": fit_seconds},
    }
    return {"decays": bank.decays, "coeffs": coeffs, "metadata": np.asarray(json.dumps(metadata))}


def fit_lds_bank(
    L: int,
    K: int,
    variant: str = "standard",
    num_states: int = DEFAULT_NUM_STATES,
    *,
    ridge: float = DEFAULT_RIDGE,
    x_range: tuple[float, float] | None = None,
    arithmetic: Arithmetic = "plain",
    tail: TailOptions = NO_TAIL,
) -> tuple[LDSBank, dict[str, Any]]:
    """Fit an LDS bank to the ``L``-tap spectral filters (cached on disk; runs on the host CPU).

    Args:
      L: filter length. K: filters per branch (``K < L``). variant: ``"standard"``/``"hankel_l"``.
      num_states: states per input channel, both signs counted (even); ``num_states / 2`` grid
        nodes.
      ridge: Tikhonov weight relative to the largest singular value of the unit-norm basis.
      x_range: fixed grid ``(x_min, x_max)`` in ``x = log(-log a)``; default: the best of
        :data:`X_MIN_OFFSETS` x :data:`X_MAX_CANDIDATES` by predicted error (module docstring).
      arithmetic: the arithmetic the bank is meant to run in, ``"plain"`` (default) or
        ``"compensated"`` float32: it weighs the candidate grids, and the report measures the
        float32 error in it.
      tail: bank-side horizon options (:class:`TailOptions`: the tail-penalised fit, the
        eigenvalue cap); off by default.

    Returns:
      ``(bank, report)``; the report (a dict, see :func:`spectral_jax.distill.report.bank_report`)
      also holds ``fit_seconds``, the time of the uncached fit including the filters.
    """
    _check_fit_args(L, K, variant, num_states, ridge, x_range, arithmetic)
    grid = "auto" if x_range is None else f"x{x_range[0]:.6g}_{x_range[1]:.6g}"
    name = (
        f"ldsbank-{variant}-L{L}-K{K}-n{num_states}-r{ridge:.3g}-{grid}-{arithmetic}"
        f"{tail.name()}-v{ALGORITHM_VERSION}.npz"
    )
    arrays = cached_arrays(
        name, lambda: _fit(int(L), int(K), variant, num_states, ridge, x_range, arithmetic, tail)
    )
    bank = bank_from_arrays(arrays, int(L), variant)
    return bank, bank.metadata["report"]
