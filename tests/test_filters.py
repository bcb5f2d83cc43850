"""Spectral filters: quadrature factor, agreement with a dense eigensolver, cache, errors."""

import functools

import numpy as np
import pytest

from spectral_jax.ops import disk_cache, filters

EPS = np.finfo(np.float64).eps


@functools.cache
def dense_eig(L, variant):
    """Dense reference: eigenpairs of the Hankel matrix, decreasing, with our sign convention."""
    Z = filters.hankel_matrix(L, variant)
    if variant == "standard":
        w, U = np.linalg.eigh(Z)
    else:  # Z[i, j] = 0 for odd i + j: two independent dense problems, on even and odd indices
        w, U = np.zeros(L), np.zeros((L, L))
        cols = 0
        for parity in (0, 1):
            idx = np.arange(parity, L, 2)
            w_p, U_p = np.linalg.eigh(Z[np.ix_(idx, idx)])
            w[cols : cols + idx.size] = w_p
            U[idx, cols : cols + idx.size] = U_p
            cols += idx.size
        order = np.argsort(w)
        w, U = w[order], U[:, order]
    return Z, w[::-1], filters.fix_signs(U[:, ::-1])


@pytest.mark.parametrize("variant", filters.VARIANTS)
@pytest.mark.parametrize("L", [2, 3, 17, 64, 1000])
def test_quadrature_factor_reproduces_hankel_matrix(L, variant):
    Z = filters.hankel_matrix(L, variant)
    V = filters.hankel_factor(L, variant)
    # Round-off of Z itself is ~eps * ||Z||; the quadrature adds less than that.
    assert np.linalg.norm(Z - V @ V.T, 2) <= 8 * EPS * np.linalg.norm(Z, 2)


def test_hankel_matrix_entries():
    Z = filters.hankel_matrix(3, "standard")
    assert Z[0, 0] == pytest.approx(2 / (8 - 2))
    assert Z[1, 2] == pytest.approx(2 / (125 - 5))
    ZL = filters.hankel_matrix(3, "hankel_l")
    assert ZL[0, 1] == 0.0
    assert ZL[0, 0] == pytest.approx(2 * 8 / (5 * 1 * 3))
    assert ZL[1, 1] == pytest.approx(2 * 8 / (7 * 3 * 5))


@pytest.mark.parametrize("variant", filters.VARIANTS)
# 4096 is one block (BLOCK_ROWS) like 1024, and its dense eigh takes ~15 s: run with -m slow.
@pytest.mark.parametrize("L", [64, 1024, pytest.param(4096, marks=pytest.mark.slow)])
def test_filters_match_dense_eigensolver(L, variant):
    K = 24
    phi, sigma = filters.spectral_filters(L, K, variant)
    Z, w, U = dense_eig(L, variant)
    assert phi.shape == (L, K) and phi.dtype == np.float64
    np.testing.assert_allclose(sigma, w[:K], rtol=0, atol=64 * EPS * w[0])

    # Both solvers are backward stable: residual ||Z u - sigma u|| at round-off.
    u = phi / sigma**0.25
    res_fast = np.linalg.norm(Z @ u - u * sigma, axis=0)
    res_dense = np.linalg.norm(Z @ U[:, :K] - U[:, :K] * w[:K], axis=0)
    assert res_fast.max() <= 32 * EPS * w[0]
    assert np.abs(u.T @ u - np.eye(K)).max() <= 64 * EPS

    # An eigenvector is determined only to (residual / gap) (Davis-Kahan), so the two solvers
    # can be compared only where that bound, scaled like the filter, is within the tolerance.
    gaps = np.minimum(np.abs(w[:K] - w[1 : K + 1]), np.abs(w[:K] - np.r_[np.inf, w[: K - 1]]))
    bound = (res_fast + res_dense) / gaps * np.abs(w[:K]) ** 0.25
    trusted = bound <= 1e-9
    assert trusted[:8].all(), "the comparison must cover at least the 8 leading filters"
    ref = U[:, :K] * np.abs(w[:K]) ** 0.25
    assert np.abs(phi - ref)[:, trusted].max() <= 1e-9


@pytest.mark.parametrize("variant", filters.VARIANTS)
def test_blocked_qr_matches_plain_qr(variant):
    """The self-similar blocked QR (several full blocks plus a remainder) equals a plain QR."""
    L, K = 1000, 12
    u_blocked, s_blocked = filters.left_singular_vectors(L, K, variant, block_rows=96)
    q, r = np.linalg.qr(filters.hankel_factor(L, variant))
    u_small, s, _ = np.linalg.svd(r)
    u_plain = filters.fix_signs(q @ u_small[:, :K])
    np.testing.assert_allclose(s_blocked, s[:K], rtol=1e-10)
    # Directions are fixed to ~eps * s_1 / (s_k gap); the 12th is ~1e-5 below the 1st.
    assert np.abs(filters.fix_signs(u_blocked) - u_plain).max() <= 1e-9


@pytest.mark.parametrize("variant", filters.VARIANTS)
def test_long_filters_are_eigenvectors_of_the_factor(variant):
    """At L = 2^17 (no dense solver possible) check residuals against the exact factor."""
    L, K = 2**17, 24
    phi, sigma = filters.spectral_filters(L, K, variant)
    V = filters.hankel_factor(L, variant)
    u = phi / sigma**0.25
    assert np.linalg.norm(V @ (V.T @ u) - u * sigma, axis=0).max() <= 64 * EPS * sigma[0]
    assert np.abs(u.T @ u - np.eye(K)).max() <= 64 * EPS
    assert np.all(np.diff(sigma) < 0)


def test_sign_convention_is_deterministic():
    phi, _ = filters.spectral_filters(256, 16)
    first = np.argmax(np.abs(phi) >= 1e-3 * np.abs(phi).max(axis=0), axis=0)
    assert np.all(phi[first, np.arange(16)] > 0)


def test_disk_cache_roundtrip_and_atomicity(private_cache):
    phi, sigma = filters.spectral_filters(128, 8)
    files = sorted(p.name for p in private_cache.iterdir())
    assert files == ["filters-standard-L128-K8-v1.npz"], "no temporary files may remain"
    filters.clear_memory_cache()
    phi2, sigma2 = filters.spectral_filters(128, 8)
    np.testing.assert_array_equal(phi, phi2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(ValueError):
        phi2[0, 0] = 1.0  # shared results are read-only


def test_corrupt_cache_file_is_recomputed(private_cache):
    expected, _ = filters.spectral_filters(64, 4)
    filters.clear_memory_cache()
    path = private_cache / "filters-standard-L64-K4-v1.npz"
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        phi, _ = filters.spectral_filters(64, 4)
    np.testing.assert_array_equal(phi, expected)
    assert disk_cache.load_npz(path)["filters"].shape == (64, 4)


def test_cache_can_be_disabled(monkeypatch, private_cache):
    monkeypatch.setenv("SPECTRAL_JAX_CACHE", "off")
    assert disk_cache.cache_dir() is None
    filters.spectral_filters(32, 4)
    assert not private_cache.exists()


@pytest.mark.parametrize(
    ("L", "K", "variant", "match"),
    [
        (1, 1, "standard", "L must be an integer >= 2"),
        (64.0, 4, "standard", "L must be an integer >= 2"),
        (64, 0, "standard", r"K must be an integer in \[1, 64\]"),
        (16, 17, "standard", r"K must be an integer in \[1, 16\]"),
        (4096, 200, "standard", "below float64 round-off"),
        (64, 4, "hankel", "variant must be one of"),
    ],
)
def test_bad_arguments_raise(L, K, variant, match):
    with pytest.raises(ValueError, match=match):
        filters.spectral_filters(L, K, variant)
