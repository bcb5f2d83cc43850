"""Per-channel state reduction of a tensordot distilled layer (float64 NumPy, on the host).

Through the bank, each output channel ``c`` of a tensordot layer is a single-input
single-output diagonal system: decays ``a_j`` (both branches, ``N = S * n`` states), input 1 and
readout ``r[c, j]``, with the kernel ``h_c[t] = sum_j r[c, j] a_j^t``. Its Hankel singular values
fall fast (a few dozen states carry it to ~1e-6), so each channel is cut to its own ``r_c`` states
by **balanced truncation**:

* the system ``(A = diag(a), B = 1, C = r_c)`` has Markov parameters ``C A^t B = h_c[t]``; its
  infinite-horizon Gramians are Cauchy matrices, ``P[i, j] = 1 / (1 - a_i a_j)`` (the same for
  every channel) and ``Q = diag(r_c) P diag(r_c)``. With ``P = F F^T`` (one eigendecomposition
  per bank), the Hankel singular values of channel ``c`` are the absolute eigenvalues of the
  symmetric ``F^T diag(r_c) F``, and its eigenvectors give the balancing projections;
* keeping the ``k`` largest, ``||h - h_k||_2 <= ||G - G_k||_inf <= 2 sum_{i >= k} sigma_i``
  (the impulse response's 2-norm over all ``t >= 0`` is at most the transfer function's H-inf
  norm): :func:`reduce_channels` keeps the fewest states whose bound, relative to ``||h_c||`` at
  the model's length, is at most ``tol``;
* the reduced ``A_k`` is diagonalised. Its eigenvalues are real or complex-conjugate pairs (the
  readouts have mixed signs, so about a third of them come in pairs): each real one and each pair
  becomes one complex *slot* ``z' = lambda z + u`` read out as ``Re(rho z)`` (a pair's two real
  states are one complex state; a real decay leaves its slot's imaginary part at zero). Real and
  imaginary parts are rounded to float32, so the float32 recurrence runs exactly them, and the
  readout is refitted by float64 least squares against ``h_c`` on ``[0, L)`` (normal equations
  in closed form, :func:`_refit`): the refit undoes
  the rounding (at ``L = 8192`` a rounding of ``6e-8`` in a slow decay moves its response by
  ~``L * 6e-8``). The measured error is reported next to the bound.

Channels pad to one rectangular ``[C, m_max]`` of slots with decay 0 and readout 0 (a padded
slot holds only the last drive and is never read).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spectral_jax.validation import finite_float, positive_int

# Relative kernel error at the model's length that the default reduction allows, set by
# measurement: about the float32 error the unreduced plain layer already has at L=8192 (1.2e-5
# for the filters, more per channel); on lm_bytes_small (L=256, 600 steps) 1e-5 and 1e-3 both
# left bits/byte within 4e-7 of the STU and greedy continuations identical, and at L=8192, K=24
# it keeps 36-44 states (29 slots) per channel against 40-48 (39) for 1e-5.
DEFAULT_TOL = 1e-4
# Hankel singular values below this fraction of the largest are float64 round-off.
RANK_RTOL = 1e-13


@dataclasses.dataclass(frozen=True)
class ReducedChannels:
    """The reduced diagonal systems of ``C`` channels, padded to ``m_max`` complex slots.

    Attributes:
      decays: ``[C, m_max]`` complex128, real and imaginary parts exactly float32; padding 0.
      readout: ``[C, m_max]`` complex128 (``h[t] = Re(sum_m readout[m] decays[m]^t)``).
      states: ``[C]`` real states kept per channel (the truncation order ``k``).
      bound: ``[C]`` the balanced-truncation bound ``2 sum(discarded sigma) / ||h_c||``.
      error: ``[C]`` measured ``||h_r - h_c|| / ||h_c||`` over ``[0, L)`` (float64).
    """

    decays: np.ndarray
    readout: np.ndarray
    states: np.ndarray
    bound: np.ndarray
    error: np.ndarray

    @property
    def slots(self) -> int:
        """``m_max``: complex slots per channel after padding (2 float32 each)."""
        return self.decays.shape[1]

    def summary(self) -> dict:
        """Per-layer numbers for the distillation report."""
        return {
            "states_min": int(self.states.min()),
            "states_mean": float(self.states.mean()),
            "states_max": int(self.states.max()),
            "slots": self.slots,
            "bound_max": float(self.bound.max()),
            "error_max": float(self.error.max()),
        }


def gramian_factor(decays: np.ndarray) -> np.ndarray:
    """``F [N, N]`` with ``F F^T = P``, ``P[i, j] = 1 / (1 - a_i a_j)``: the controllability
    Gramian of ``(diag(a), 1)``, from its eigendecomposition (negative round-off clipped)."""
    a = np.asarray(decays, np.float64)
    w, v = np.linalg.eigh(1.0 / (1.0 - np.outer(a, a)))
    return v * np.sqrt(np.clip(w, 0.0, None))


def _balanced_eigs(factor: np.ndarray, readout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric ``F^T diag(r_c) F`` of every channel ``readout [C, N]``,
    by descending ``|eigenvalue|``: ``([C, N], [C, N, N])``."""
    lam, w = np.linalg.eigh((factor.T[None] * readout[:, None, :]) @ factor)
    order = np.argsort(-np.abs(lam), axis=-1)
    return np.take_along_axis(lam, order, -1), np.take_along_axis(w, order[:, None, :], -1)


def _truncated_decays(a, factor, r, lam, w, k: int) -> np.ndarray:
    """Eigenvalues ``[k]`` of one channel's balanced truncation to ``k`` states, from its
    readout ``r [N]`` and eigenpairs ``lam [N], w [N, N]`` (:func:`_balanced_eigs`)."""
    lam, w = lam[:k], w[:, :k]
    scale = 1.0 / np.sqrt(np.abs(lam))
    right = factor @ (w * scale)  # T_r [N, k]
    left = (np.sign(lam) * scale)[:, None] * (w.T @ factor.T) * r  # T_l [k, N], T_l T_r = I
    return np.linalg.eigvals(left @ (a[:, None] * right))


def _powers(decays: np.ndarray, length: int) -> np.ndarray:
    """``decays^t`` for ``t < length``: ``[k] -> [length, k]`` (complex), as
    ``exp(t log decay)`` (a decay of 0 gives ``0^0 = 1``, then 0)."""
    t = np.arange(length)[:, None]
    safe = np.where(decays == 0, 1.0, decays)
    return np.where(decays == 0, (t == 0).astype(float), np.exp(t * np.log(safe.astype(complex))))


def _geometric(z: np.ndarray, length: int) -> np.ndarray:
    """``sum_{t < length} z^t = (1 - z^length) / (1 - z)`` for ``|z| < 1``."""
    return (1 - z**length) / (1 - z)


def _refit(slots: np.ndarray, decays: np.ndarray, readout: np.ndarray, length: int):
    """Least-squares readout ``rho [m]`` (complex) with ``Re(sum_m rho lambda_m^t)`` closest to
    the channel's kernel ``sum_j readout[j] decays[j]^t`` on ``[0, length)``.

    Over the conjugate-closed set of the slots' decays the normal equations have closed forms
    (every entry is a geometric sum), so nothing of size ``length`` is formed: the Gram matrix
    ``G[i, j] = S(conj(lambda_i) lambda_j)`` and ``b[i] = sum_j readout[j] S(conj(lambda_i)
    a_j)``. They are solved by a pseudo-inverse of ``G``; the measured error (evaluated over
    ``[0, length)`` by the caller) shows what the squared conditioning costs.
    """
    lam = np.concatenate([slots, np.conj(slots[slots.imag != 0])])
    gram = _geometric(np.conj(lam)[:, None] * lam[None, :], length)
    rhs = _geometric(np.conj(lam)[:, None] * decays[None, :], length) @ readout
    rho = np.linalg.lstsq(gram, rhs, rcond=1e-15)[0]
    # Re(rho_l l^t + rho_c conj(l)^t) = Re((rho_l + conj(rho_c)) l^t): the pair's one slot
    # (rounding makes rho_c only nearly conj(rho_l))
    out = rho[: slots.size].copy()
    out[slots.imag != 0] += np.conj(rho[slots.size :])
    return np.where(slots.imag != 0, out, out.real)


def _refit_direct(slots: np.ndarray, powers: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """As :func:`_refit`, by a float64 QR of the real basis ``[length, m + pairs]`` (from the
    slots' ``powers [length, m]``): slower, but without the normal equations' squared
    conditioning; used where those miss the bound."""
    pairs = slots.imag != 0
    q, r = np.linalg.qr(np.concatenate([powers.real, -powers.imag[:, pairs]], axis=1))
    coef = np.linalg.lstsq(r, q.T @ kernel, rcond=None)[0]
    rho = coef[: slots.size].astype(np.complex128)
    rho[pairs] += 1j * coef[slots.size :]
    return rho


def _round32(values: np.ndarray) -> np.ndarray:
    """Real and imaginary parts rounded to float32 (kept as complex128)."""
    as32 = lambda v: v.astype(np.float32).astype(np.float64)  # noqa: E731
    return as32(values.real) + 1j * as32(values.imag)


def reduce_channels(
    decays: np.ndarray,
    readout: np.ndarray,
    length: int,
    tol: float = DEFAULT_TOL,
    max_states: int | None = None,
) -> ReducedChannels:
    """Balanced truncation of every channel (module docstring).

    Args:
      decays: ``[N]`` float64 decays of the bank's states (both branches flattened).
      readout: ``[C, N]`` float64 readout of each channel.
      length: the model's length ``L``, where the kernel error is measured.
      tol: the largest relative kernel error allowed (the bound is kept below it).
      max_states: at most this many states per channel (None: as many as ``tol`` needs; with a
        cap below that, the error may exceed ``tol``, which the report shows).
    """
    a = np.asarray(decays, np.float64)
    r = np.asarray(readout, np.float64)
    if a.ndim != 1 or r.ndim != 2 or r.shape[1] != a.size:
        raise ValueError(
            f"reduce_channels needs decays [N] and readout [C, N], got {a.shape}, {r.shape}"
        )
    tol = finite_float("reduce_channels", "tol", tol)
    if not 0 < tol < 1:
        raise ValueError(f"reduce_channels.tol must be in (0, 1), got {tol!r}")
    if max_states is not None:
        positive_int("reduce_channels", "max_states", max_states)
    cap = a.size if max_states is None else min(int(max_states), a.size)
    factor = gramian_factor(a)
    eigs, vectors = _balanced_eigs(factor, r)
    sigma = np.abs(eigs)  # [C, N] Hankel singular values, descending
    kernels = r @ (a[None, :] ** np.arange(length)[:, None]).T  # [C, L]
    norms = np.linalg.norm(kernels, axis=1)
    # tails[c, k] = 2 sum_{i >= k} sigma[c, i]: the bound when k states are kept
    tails = 2 * np.concatenate([np.cumsum(sigma[:, ::-1], 1)[:, ::-1], 0 * sigma[:, :1]], 1)
    channels = []
    for c in range(r.shape[0]):
        if norms[c] == 0:  # a dead channel keeps no state
            channels.append((np.zeros(0, complex), np.zeros(0, complex), 0, 0.0, 0.0))
            continue
        # beyond the numerical rank the balancing would divide by round-off
        rank = max(1, int(np.sum(sigma[c] > RANK_RTOL * sigma[c, 0])))
        k = max(1, min(int(np.argmax(tails[c] <= tol * norms[c])), rank, cap))
        lam = _truncated_decays(a, factor, r[c], eigs[c], vectors[c], k)
        # one slot per real decay and per conjugate pair (the one with positive imaginary part)
        slots = _round32(lam[lam.imag >= 0])
        slots = np.clip(slots.real, -1 + 2**-23, 1 - 2**-23) + 1j * slots.imag
        powers = _powers(slots, length)
        rho = _refit(slots, a, r[c], length)
        error = np.linalg.norm((powers @ rho).real - kernels[c]) / norms[c]
        if error > tails[c, k] / norms[c]:
            rho = _refit_direct(slots, powers, kernels[c])
            error = np.linalg.norm((powers @ rho).real - kernels[c]) / norms[c]
        channels.append((slots, rho, k, tails[c, k] / norms[c], error))
    width = max(1, *(ch[0].size for ch in channels))
    pad = lambda v: np.pad(v, (0, width - v.size))  # noqa: E731
    return ReducedChannels(
        decays=np.stack([pad(ch[0]) for ch in channels]),
        readout=np.stack([pad(ch[1]) for ch in channels]),
        states=np.asarray([ch[2] for ch in channels]),
        bound=np.asarray([ch[3] for ch in channels]),
        error=np.asarray([ch[4] for ch in channels]),
    )


# log|decay| stored for a padded slot (decay 0): its powers underflow to exactly 0
PAD_LOG_ABS = -1e4


def reducible(projection: str, arithmetic: str) -> bool:
    """Whether a layer's LDS is reduced per channel: tensordot projections in plain arithmetic
    (full projections share one bank across channels, and compensated layers keep their exact
    pair arithmetic over the unreduced bank)."""
    return projection == "tensordot" and arithmetic == "plain"


def reduce_readout(
    readout: np.ndarray, branch_decays: np.ndarray, length: int, tol: float, max_states=None
) -> ReducedChannels:
    """:func:`reduce_channels` of a tensordot layer's folded ``readout [C, S, n]`` over the
    bank's ``branch_decays [S, n]``."""
    readout = np.asarray(readout, np.float64)
    return reduce_channels(
        branch_decays.reshape(-1), readout.reshape(readout.shape[0], -1), length, tol, max_states
    )


def slot_tables(decays: np.ndarray, readout: np.ndarray, length: int) -> tuple:
    """Host-side float64 arrays of a reduced layer from its slots ``decays, readout [C, m]``
    (complex): ``(decay table [C, m, 5]`` of real part, imaginary part, ``log|decay|``,
    ``phi`` and ``sign`` (``decay = sign |decay| exp(i phi)``, ``|phi| <= pi / 2``),
    ``readout [C, m, 2]`` of real and imaginary parts, ``kernels [length, C])``.
    ``log|decay|`` and the argument come from float64, so the float32 powers of the prefill are
    accurate to ``~eps (1 + t |log decay|)`` also for ``|decay|`` near 1."""
    decays = np.asarray(decays, np.complex128)
    readout = np.asarray(readout, np.complex128)
    modulus = np.abs(decays)
    if np.any(modulus >= 1):
        raise ValueError("reduced decays must lie inside the unit circle for a stable LDS")
    log_abs = np.where(modulus > 0, np.log(np.where(modulus > 0, modulus, 1.0)), PAD_LOG_ABS)
    # decay = sign |decay| exp(i phi) with |phi| <= pi / 2: the powers' phase error is
    # ~n eps |phi|, and a negative real decay has phi = 0 exactly
    sign = np.where(decays.real < 0, -1.0, 1.0)
    table = np.stack([decays.real, decays.imag, log_abs, np.angle(sign * decays), sign], axis=-1)
    kernels = np.stack(
        [(_powers(d, length) @ r).real for d, r in zip(decays, readout, strict=True)], 1
    )
    return table, np.stack([readout.real, readout.imag], axis=-1), kernels
