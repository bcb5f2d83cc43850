"""Hankel matrices and spectral filters for any sequence length.

Both Hankel matrices are continuous mixtures of scalar-LDS impulse responses
``v(a) = (1, a, a^2, ..., a^(L-1))``:

* standard: ``Z[i, j] = 2 / ((i+j)^3 - (i+j)) = int_0^1 (1-a)^2 v(a) v(a)^T da``;
* Hankel-L: ``Z[i, j] = ((-1)^(i+j-2) + 1) * 8 / ((i+j+3)(i+j-1)(i+j+1))
  = int_{-1}^{1} (1-a^2)^2 v(a) v(a)^T da``

(indices ``i, j = 1..L``). Substituting ``a = exp(-exp(x))`` turns the integral into one over the
real line of a function analytic in the strip ``|Im x| < pi/2``, for which the trapezoid rule with
step ``h`` converges like ``exp(-pi^2 / h)``. Nodes ``a_j`` with weights ``w_j`` give
``Z ~= V V^T`` with ``V[:, j] = sqrt(w_j) v(a_j)``: a factor of rank ~90 whose error is at the
float64 round-off level for every ``L``. The top eigenvectors of ``Z`` are the top left singular
vectors of ``V``: ``O(L m^2)`` work instead of a dense ``O(L^3)`` eigensolver. The same nodes are
the natural decays for distilling the filters into an LDS (:mod:`spectral_jax.distill.fit`).

Everything here is float64 NumPy on the host; results are cached in memory and on disk.
"""

from __future__ import annotations

import functools

import numpy as np

from spectral_jax.ops.disk_cache import cached_arrays
from spectral_jax.validation import VARIANTS, Variant, int_in_range, one_of, positive_int

# Trapezoid step in x = log(-log a). The quadrature error is ~exp(-pi^2 / STEP) ~ 1e-17.
QUADRATURE_STEP = 0.25
# Above x = 4 every weight is below exp(-e^4) ~ 2e-24 of the largest.
QUADRATURE_X_MAX = 4.0
# Rows of the leading block in the structured QR of the factor.
BLOCK_ROWS = 4096
# Bump when the algorithm changes so stale cache files are never read.
_ALGORITHM_VERSION = 1


def _check_variant(variant: str) -> None:
    one_of("", "variant", variant, VARIANTS)


def _check_length(L: int) -> None:
    positive_int("", "sequence length L", L, minimum=2)


def hankel_matrix(L: int, variant: Variant = "standard") -> np.ndarray:
    """Dense Hankel matrix ``Z: [L, L]`` (float64). ``O(L^2)`` memory: for tests and references."""
    _check_length(L)
    _check_variant(variant)
    s = np.arange(1, L + 1, dtype=np.float64)
    s = s[:, None] + s[None, :]  # i + j
    if variant == "standard":
        return 2.0 / (s**3 - s)
    even = (np.round(s).astype(np.int64) % 2) == 0
    return np.where(even, 16.0 / ((s + 3.0) * (s - 1.0) * (s + 1.0)), 0.0)


def hankel_quadrature(L: int, variant: Variant = "standard") -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights of the Hankel matrix's LDS-mixture integral.

    Returns ``(decays [m], weights [m])`` with decays in (0, 1), increasing, such that
    ``Z ~= sum_j weights[j] * v(a_j) v(a_j)^T`` for ``standard`` and
    ``Z ~= sum_j weights[j] * (v(a_j) v(a_j)^T + v(-a_j) v(-a_j)^T)`` for ``hankel_l``,
    where ``v(a)[t] = a^t``. The operator-norm error is at float64 round-off for this ``L``.
    """
    _check_length(L)
    _check_variant(variant)
    # Left truncation: nodes below x_min carry total mass ~ L * exp(3 x_min) / 3 < 1e-17.
    x_min = -(40.0 + np.log(L)) / 3.0
    n = int(np.ceil((QUADRATURE_X_MAX - x_min) / QUADRATURE_STEP))
    x = QUADRATURE_X_MAX - QUADRATURE_STEP * np.arange(n + 1)[::-1]
    tau = np.exp(x)  # a = exp(-tau)
    a = np.exp(-tau)
    one_minus_a = -np.expm1(-tau)  # 1 - a without cancellation
    density = one_minus_a**2 if variant == "standard" else (one_minus_a * (1.0 + a)) ** 2
    # da = -a * tau * dx
    weights = QUADRATURE_STEP * density * a * tau
    return a, weights


def _signed_nodes(L: int, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
    """Decays (negative ones too for Hankel-L) and weights of the factor's columns."""
    a, w = hankel_quadrature(L, variant)
    if variant == "hankel_l":
        return np.concatenate([a, -a]), np.concatenate([w, w])
    return a, w


def _powers(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``a^t`` for decays ``a: [m]`` in (-1, 1) and integer exponents ``t: [n]`` -> ``[n, m]``,
    as ``sign^t * exp(t log|a|)`` (accurate for ``a`` close to 1, unlike repeated products)."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    magnitude = np.exp(t * np.log(np.abs(a))[None, :])
    return np.where((a < 0)[None, :] & (t % 2 == 1), -magnitude, magnitude)


def hankel_factor(L: int, variant: Variant = "standard") -> np.ndarray:
    """Low-rank factor ``V: [L, m]`` (float64) with ``Z ~= V V^T`` to float64 round-off."""
    _check_length(L)
    a, w = _signed_nodes(L, variant)
    return _powers(a, np.arange(L)) * np.sqrt(w)[None, :]


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Sign convention: in each column, the first entry whose magnitude reaches 1e-3 of the
    column's largest magnitude is positive. (Robust to round-off, unlike "first nonzero entry",
    and well defined for Hankel-L eigenvectors supported on odd indices only.)"""
    mags = np.abs(vectors)
    first = np.argmax(mags >= 1e-3 * mags.max(axis=0, keepdims=True), axis=0)
    signs = np.sign(vectors[first, np.arange(vectors.shape[1])])
    return vectors * signs[None, :]


def left_singular_vectors(
    L: int, K: int, variant: Variant, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``K`` left singular vectors ``[L, K]`` and singular values of the factor ``V``.

    ``V`` is self-similar: rows ``bT .. bT+T-1`` equal ``V0 diag(a^(bT))`` with ``V0`` its first
    ``T`` rows. So ``V = blockdiag(Q0, ..., Q0) S`` with ``V0 = Q0 R0`` and ``S`` the stack of
    ``R0 diag(a^(bT))``: a backward-stable QR of the tall factor costs one ``T x m`` QR plus one
    QR of the short stack, and the singular vectors are ``Q0`` times blocks of ``S``'s.
    ``block_rows`` is ``T`` (the default is for speed; tests use small blocks).
    """
    a, w = _signed_nodes(L, variant)
    block = min(L, block_rows)
    num_full, rest = divmod(L, block)
    v0 = _powers(a, np.arange(block)) * np.sqrt(w)[None, :]
    q0, r0 = np.linalg.qr(v0)
    starts = np.arange(num_full) * block
    stack = [r0[None] * _powers(a, starts)[:, None, :]]  # [num_full, r, m]
    if rest:
        q_rest, r_rest = np.linalg.qr(v0[:rest])
        stack.append((r_rest * _powers(a, [num_full * block]))[None])
    rank = r0.shape[0]
    q_s, r_s = np.linalg.qr(np.concatenate([s.reshape(-1, a.size) for s in stack]))
    u_small, s, _ = np.linalg.svd(r_s, full_matrices=False)
    y = q_s @ u_small[:, :K]  # [num_full * rank (+ rest rows), K]
    full = q0 @ y[: num_full * rank].reshape(num_full, rank, K).transpose(1, 0, 2).reshape(rank, -1)
    vectors = full.reshape(block, num_full, K).transpose(1, 0, 2).reshape(num_full * block, K)
    if rest:
        vectors = np.concatenate([vectors, q_rest @ y[num_full * rank :]])
    return vectors, s[:K]


def _compute_filters(L: int, K: int, variant: Variant) -> dict[str, np.ndarray]:
    vectors, singular_values = left_singular_vectors(L, K, variant)
    eigvals = singular_values**2
    return {"filters": fix_signs(vectors) * eigvals[None, :] ** 0.25, "eigvals": eigvals}


def max_num_filters(L: int, variant: Variant = "standard") -> int:
    """Largest ``K`` that :func:`spectral_filters` accepts at length ``L``: ``L`` itself, capped by
    the rank of the quadrature factor (eigenvalues beyond it are below float64 round-off)."""
    a, _ = hankel_quadrature(L, variant)
    rank = a.size * (2 if variant == "hankel_l" else 1)
    return min(L, rank)


@functools.lru_cache(maxsize=32)
def _filters_cached(L: int, K: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    name = f"filters-{variant}-L{L}-K{K}-v{_ALGORITHM_VERSION}.npz"
    arrays = cached_arrays(name, lambda: _compute_filters(L, K, variant))
    return arrays["filters"], arrays["eigvals"]


def spectral_filters(
    L: int, K: int, variant: Variant = "standard"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``K`` spectral filters of the Hankel matrix of size ``L``.

    Args:
      L: sequence length, any integer >= 2 (tested up to 2^20).
      K: number of filters, ``1 <= K <= max_num_filters(L, variant)``.
      variant: ``"standard"`` or ``"hankel_l"``.

    Returns:
      ``(filters [L, K], eigvals [K])``, float64 and read-only: eigenvectors ``phi_k`` of the Hankel
      matrix in decreasing eigenvalue order, each scaled by ``sigma_k^(1/4)``, with the sign
      convention of :func:`fix_signs`. Cached in memory and on disk (see
      :func:`spectral_jax.ops.disk_cache.cache_dir`).
    """
    _check_length(L)
    _check_variant(variant)
    limit = max_num_filters(L, variant)
    why = f"for L={L} ({variant})" + (
        "" if limit == L else f"; eigenvalues beyond {limit} are below float64 round-off"
    )
    int_in_range("", "number of filters K", K, 1, limit, why)
    return _filters_cached(int(L), int(K), variant)


def clear_memory_cache() -> None:
    """Forget the filters kept in memory (the disk cache is untouched): the next
    :func:`spectral_filters` call reads the disk cache or recomputes."""
    _filters_cached.cache_clear()
