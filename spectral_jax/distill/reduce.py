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

The slots are then packed into real 2-state blocks (:func:`pack_blocks`: a pair's real and
imaginary parts, or two real decays), so each real state costs one float32; channels pad to one
rectangular ``[P, C]`` of blocks with decay 0 and readout 0 (a padded state holds only the last
drive and is never read).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from spectral_jax.distill.block_tables import decay_powers, power_chunks
from spectral_jax.validation import finite_float, positive_int

# Relative kernel error at the model's length that the default reduction allows, set by
# measurement (December 2026, CPU). On lm_bytes_small (L=256, 2000 steps, horizon cap:0.001,
# ``experiments/distill_lm.py --tol 1e-4 1e-3 0``) tol 1e-3 leaves bits/byte -8.6e-7 from the
# STU's (1e-4: +2.6e-6; unreduced: +2.5e-6) and all 5 greedy 200-byte continuations identical,
# with 19.5 real states per channel on average (1e-4: 24.3). The headline model (d=128, K=24,
# random weights) keeps 60,468 state bytes per sequence at L=3072 (7.4x Griffin's 8,192; 1e-4:
# 73,668), 64,844 at L=8192 and 79,148 at L=139264.
DEFAULT_TOL = 1e-3
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
        """``P``: real 2-state blocks per channel after padding (:func:`pack_blocks`)."""
        return self.blocks()[0].shape[1]

    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`pack_blocks` of the channels: ``(mu, weights)``, both ``[C, P, 2]``."""
        return pack_blocks(self.decays, self.readout)

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


def _truncate(a, factor, r, lam, w, k: int, kernel: np.ndarray, bound: float) -> tuple:
    """One channel's balanced truncation to ``k`` states (readout ``r [N]``, eigenpairs from
    :func:`_balanced_eigs`), its slots rounded to float32 and its readout refitted against
    ``kernel [L]`` (by QR where the normal equations miss ``bound``, the absolute bound):
    ``(slots [m], readout [m], ||error||_2)``."""
    lam = _truncated_decays(a, factor, r, lam, w, k)
    # one slot per real decay and per conjugate pair (the one with positive imaginary part)
    slots = _round32(lam[lam.imag >= 0])
    slots = np.clip(slots.real, -1 + 2**-23, 1 - 2**-23) + 1j * slots.imag
    powers = decay_powers(slots, kernel.size)
    rho = _refit(slots, a, r, kernel.size)
    error = np.linalg.norm((powers @ rho).real - kernel)
    if error > bound:
        rho = _refit_direct(slots, powers, kernel)
        error = np.linalg.norm((powers @ rho).real - kernel)
    return slots, rho, error


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
    kernels = np.empty((r.shape[0], length))  # [C, L]
    for start, powers in power_chunks(a, length):
        kernels[:, start : start + powers.shape[0]] = r @ powers.T
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
        high = max(1, min(int(np.argmax(tails[c] <= tol * norms[c])), rank, cap))

        def fit(k, c=c):
            return _truncate(a, factor, r[c], eigs[c], vectors[c], k, kernels[c], tails[c, k])

        # the bound picks ``high``; the measured error (a few times below the bound) allows
        # fewer states: bisect for the fewest whose error is at most tol (then also at most
        # their bound, which exceeds tol below ``high``)
        best, low = (high, *fit(high)), 1
        while low < best[0]:
            k = (low + best[0]) // 2
            trial = fit(k)
            if trial[2] <= tol * norms[c]:
                best = (k, *trial)
            else:
                low = k + 1
        k, slots, rho, error = best
        channels.append((slots, rho, k, tails[c, k] / norms[c], error / norms[c]))
    width = max(1, *(ch[0].size for ch in channels))
    pad = lambda v: np.pad(v, (0, width - v.size))  # noqa: E731
    return ReducedChannels(
        decays=np.stack([pad(ch[0]) for ch in channels]),
        readout=np.stack([pad(ch[1]) for ch in channels]),
        states=np.asarray([ch[2] for ch in channels]),
        bound=np.asarray([ch[3] for ch in channels]),
        error=np.asarray([ch[4] for ch in channels]),
    )


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


def pack_blocks(decays: np.ndarray, readout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The real 2-state blocks of reduced channels, from their complex slots ``decays, readout
    [C, m]`` (:class:`ReducedChannels`): ``(mu [C, P, 2]`` complex, ``weights [C, P, 2]``
    real), ``P`` the most blocks of any channel.

    A block's state ``(x, y)`` advances as ``x' = Re(mu1) x - Im(mu1) y + u``,
    ``y' = Im(mu1) x + Re(mu2) y + e u`` and is read as ``wx x + wy y``. A conjugate pair
    ``lambda`` is one block (``mu1 = mu2 = lambda``, ``e = 0``, ``(x, y) = (Re z, Im z)``,
    ``(wx, wy) = (Re rho, -Im rho)``); two real decays share one (``mu1 = a1``, ``mu2 = a2``,
    ``e = 1``: two independent states). So every real state is one float32, none padded within
    a channel but an odd real one's partner (decay 0, readout 0). ``e = (Im mu1 == 0)``.
    """
    decays = np.asarray(decays, np.complex128)
    readout = np.asarray(readout, np.complex128)
    channels = []
    for d, r in zip(decays, readout, strict=True):
        pair = d.imag != 0
        real = ~pair & ((d != 0) | (r != 0))  # padded slots (decay 0, readout 0) are dropped
        a, w = d[real].real, r[real].real
        if a.size % 2:
            a, w = np.append(a, 0.0), np.append(w, 0.0)
        mu = [np.stack([d[pair], d[pair]], -1), a.reshape(-1, 2)]
        weights = [np.stack([r[pair].real, -r[pair].imag], -1), w.reshape(-1, 2)]
        channels.append((np.concatenate(mu), np.concatenate(weights)))
    width = max(1, *(mu.shape[0] for mu, _ in channels))
    pad = lambda v: np.pad(v, ((0, width - v.shape[0]), (0, 0)))  # noqa: E731
    return (
        np.stack([pad(mu) for mu, _ in channels]),
        np.stack([pad(w) for _, w in channels]).real,
    )


def block_counts(mu: np.ndarray, weights: np.ndarray) -> tuple[int, ...]:
    """Each channel's blocks before its padding, from :func:`pack_blocks`' ``mu, weights
    [C, P, 2]`` (at least 1: a dead channel keeps one empty block)."""
    used = np.any(np.asarray(mu) != 0, axis=-1) | np.any(np.asarray(weights) != 0, axis=-1)
    last = np.where(used.any(-1), used.shape[1] - np.argmax(used[:, ::-1], axis=-1), 1)
    return tuple(int(n) for n in last)


# At most this many channel groups per reduced layer, each padded to its own block count: at
# L=8192, K=24, d=128, random weights, tol 1e-3, two groups hold 15% fewer states than one, a
# third and fourth 2-3% more; each group is one more update per step, which batch 1 pays for.
CHANNEL_GROUPS = 2


def channel_groups(
    blocks: Sequence[int], max_groups: int = CHANNEL_GROUPS
) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Split a reduced layer's channels, by their ``blocks [C]`` (:func:`block_counts`), into
    at most ``max_groups`` groups of consecutive counts, each padded to its largest count, with
    the fewest padded blocks ``sum_g P_g C_g`` (and the fewest groups that reach it):
    ``((channels of the group, P_g), ...)``, groups in ascending ``P_g``, channels ascending."""
    counts = np.asarray(blocks, np.int64)
    order = np.argsort(counts, kind="stable")
    ranked = counts[order]
    C = ranked.size
    # cost[g][j]: fewest padded blocks for the j smallest channels in g groups; cut[g][j]: the
    # start of the last group
    cost = np.full((max_groups + 1, C + 1), np.inf)
    cost[0, 0] = 0
    cut = np.zeros((max_groups + 1, C + 1), np.int64)
    for g in range(1, max_groups + 1):
        for j in range(1, C + 1):
            starts = np.arange(j)
            totals = cost[g - 1, :j] + ranked[j - 1] * (j - starts)
            cut[g, j] = int(np.argmin(totals))
            cost[g, j] = totals[cut[g, j]]
    groups = int(np.argmin(cost[1:, C])) + 1
    bounds = [C]
    for g in range(groups, 0, -1):
        bounds.append(int(cut[g, bounds[-1]]))
    bounds = bounds[::-1]
    return tuple(
        (tuple(sorted(int(c) for c in order[start:stop])), int(ranked[stop - 1]))
        for start, stop in itertools.pairwise(bounds)
    )
