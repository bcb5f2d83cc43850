"""Diagonal LDS: every evaluation path against a direct float64 convolution with ``a^t``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.ops import lds
from spectral_jax.ops import lds_compensated as lc

EPS32 = float(np.finfo(np.float32).eps) / 2  # unit round-off 2^-24
EPS64 = float(np.finfo(np.float64).eps) / 2

# Fast, slow, very slow, zero and negative decays, on a [2, 4] channel grid.
DECAYS = np.array([[0.0, 0.5, 0.99, 1 - 1e-4], [-0.3, -0.9, -(1 - 1e-3), 0.999]])


def reference_states(decays, u, x0):
    """``x_t = a^(t+1) x0 + sum_{s<=t} a^(t-s) u_s`` by a direct O(L^2) sum in float64."""
    L = u.shape[1]
    t = np.arange(L)
    lag = t[:, None] - t[None, :]  # [t, s]
    powers = np.where(lag >= 0, decays[..., None, None] ** np.maximum(lag, 0), 0.0)  # [*S, t, s]
    conv = np.einsum("...ts,bs...->bt...", powers, u)
    return conv + decays[None, None] ** (t + 1)[None, :, None, None] * x0[:, None]


def test_all_paths_match_direct_convolution_x64():
    rng = np.random.default_rng(0)
    B, L = 2, 48
    u = rng.standard_normal((B, L, *DECAYS.shape))
    x0 = rng.standard_normal((B, *DECAYS.shape))
    ref = reference_states(DECAYS, u, x0)
    with jax.enable_x64(True):
        a, uj, x0j = (jnp.asarray(v, jnp.float64) for v in (DECAYS, u, x0))
        seq = lds.scan(a, uj, x0j)
        par = lds.parallel_scan(a, uj, x0j)
        x, stepped = x0j, []
        for t in range(L):
            x = lds.step(a, x, uj[:, t])
            stepped.append(x)
        stepped = jnp.stack(stepped, axis=1)
        # Without an initial state, the states are the causal convolution with impulse_response.
        h = np.asarray(lds.impulse_response(a, L))  # [L, *S]
        par0 = lds.parallel_scan(a, uj)
    # Round-off of a length-L recurrence in float64, relative to the largest state.
    tol = 8 * L * EPS64
    scale = np.abs(ref).max()
    for name, got in [("scan", seq), ("parallel_scan", par), ("step loop", stepped)]:
        err = np.abs(np.asarray(got) - ref).max() / scale
        assert err <= tol, f"{name}: {err:.2e} > {tol:.2e}"
    conv = np.stack([np.einsum("ts...,bs...->bt...", _toeplitz(h, t), u) for t in range(L)], 1)
    assert np.abs(np.asarray(par0) - conv[:, :, 0]).max() / scale <= tol


def _toeplitz(h, t):
    """Row ``t`` of the causal convolution with impulse response ``h: [L, *S]``: ``[1, L, *S]``."""
    row = np.zeros_like(h)
    row[: t + 1] = h[t::-1]
    return row[None]


def test_impulse_response_values():
    with jax.enable_x64(True):
        h = np.asarray(lds.impulse_response(jnp.asarray(DECAYS), 7))
    t = np.arange(7)[:, None, None]
    np.testing.assert_allclose(h, DECAYS[None] ** t, rtol=16 * EPS64, atol=0)
    assert h.shape == (7, *DECAYS.shape) and np.all(h[0] == 1.0)


def test_parallel_scan_float32_is_accurate_for_slow_decays():
    """The exact-power combine keeps float32 errors at ~log2(L) round-offs even for decays within
    1e-5 of +-1, where the textbook combine (repeated squaring of a) loses ~L/2 round-offs."""
    L = 4096
    a = np.array([0.5, 0.99, 0.999, 1 - 1e-4, 1 - 1e-5, -(1 - 1e-4)], np.float32)
    u = np.random.default_rng(1).standard_normal((2, L, a.size)).astype(np.float32)
    ref = reference_by_scan_x64(a, u)
    scale = np.abs(ref).max(axis=(0, 1))

    def err(states):
        return (np.abs(np.asarray(states, np.float64) - ref).max(axis=(0, 1)) / scale).max()

    assert err(lds.parallel_scan(jnp.asarray(a), jnp.asarray(u))) <= np.log2(L) * EPS32
    # Sequential rounding errors add up like a random walk: ~sqrt(L) round-offs.
    assert err(lds.scan(jnp.asarray(a), jnp.asarray(u))) <= 2 * np.sqrt(L) * EPS32


def reference_by_scan_x64(a, u):
    with jax.enable_x64(True):
        return np.asarray(lds.scan(jnp.asarray(a, jnp.float64), jnp.asarray(u, jnp.float64)))


def test_jit_matches_eager():
    """Under jit the decays are tracers (no value check) and XLA may fuse ``a * x + u`` into
    one FMA, so results agree to float32 round-off of a length-L recurrence, not bitwise."""
    L = 16
    a = jnp.asarray(DECAYS, jnp.float32)
    u = jnp.asarray(np.random.default_rng(2).standard_normal((1, L, *DECAYS.shape)), jnp.float32)
    for fn in (lds.parallel_scan, lds.scan):
        eager = np.asarray(fn(a, u))
        err = np.abs(np.asarray(jax.jit(fn)(a, u)) - eager).max() / np.abs(eager).max()
        assert err <= 2 * L * EPS32


@pytest.mark.parametrize("bad", [1.0, -1.0, 1.5, np.nan, np.inf])
def test_decays_outside_unit_interval_raise(bad):
    a = np.array([0.5, bad], np.float32)
    u = jnp.zeros((1, 4, 2), jnp.float32)
    for fn in (lds.scan, lds.parallel_scan):
        with pytest.raises(ValueError, match=r"open interval \(-1, 1\)"):
            fn(a, u)
    with pytest.raises(ValueError, match="open interval"):
        lds.impulse_response(a, 3)
    with pytest.raises(ValueError, match="open interval"):
        lds.step(a, u[:, 0], u[:, 0])


def test_bad_shapes_and_dtypes_raise():
    a = jnp.full((3,), 0.5, jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        lds.scan(a, jnp.zeros((1, 4, 2), jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        lds.parallel_scan(a, jnp.zeros((4, 3), jnp.float32))
    with pytest.raises(ValueError, match="initial state"):
        lds.scan(a, jnp.zeros((2, 4, 3), jnp.float32), jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        lds.scan(np.full(3, 0.5), jnp.zeros((1, 4, 3), jnp.float32))  # float64 decays
    with pytest.raises(ValueError, match="dtype"):
        lds.scan(a, jnp.zeros((1, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="floating"):
        lds.check_decays(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="length"):
        lds.impulse_response(a, 0)


# ---- compensated (double-float32) evaluation ---------------------------------------------------


def test_error_free_transformations_are_exact():
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 20, 4096))).astype(np.float32)
    b = rng.standard_normal(4096).astype(np.float32)
    head, tail = jax.jit(lc.split)(jnp.asarray(a))
    np.testing.assert_array_equal(np.float64(head) + np.float64(tail), np.float64(a))
    # Both halves have at most 12 significant bits: their products are exact in float32.
    for half in (head, tail):
        mantissa, _ = np.frexp(np.asarray(half, np.float64))
        np.testing.assert_array_equal(mantissa * 2**12, np.round(mantissa * 2**12))
    s, e = jax.jit(lc.two_sum)(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.float64(s) + np.float64(e), np.float64(a) + np.float64(b))


def test_compensated_paths_match_float64():
    """Parallel (two scans) and step-by-step compensated states agree with float64 to ~1e-12
    relative, where the plain float32 recurrence is off by ~1e-7."""
    L = 2048
    a = np.array([0.5, 0.99, 1 - 1e-4, -(1 - 1e-4), -0.3], np.float32)
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, L, a.size)).astype(np.float32)
    x0 = lc.split_float64(rng.standard_normal((2, a.size)))
    with jax.enable_x64(True):
        x0_64 = jnp.asarray(np.float64(x0.hi) + np.float64(x0.lo))
        ref = np.asarray(lds.scan(jnp.asarray(a, jnp.float64), jnp.asarray(u, jnp.float64), x0_64))
    scale = np.abs(ref).max()
    tol = 2**-40  # ~1e-12: double-float32 carries ~48 bits; a few bits lost per length
    for fn in (lc.parallel_scan, lc.scan):
        states = fn(jnp.asarray(a), jnp.asarray(u), x0)
        value = np.float64(states.hi) + np.float64(states.lo)
        assert np.abs(value - ref).max() / scale <= tol, fn.__name__


def test_compensated_readout_survives_cancellation():
    """Pairs of nearly equal states with opposite large coefficients: the plain float32
    contraction loses everything, the compensated one keeps float32 accuracy of the result."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 40))
    x[..., 1::2] = x[..., 0::2] * (1 + 1e-6)
    w = rng.standard_normal((40, 7)) * 1e3
    w[1::2] = -w[0::2]
    exact = x @ w
    states, weights = lc.split_float64(x), lc.split_float64(w)
    got = np.float64(lc.readout(states, weights))
    scale = np.abs(exact).max()
    assert np.abs(got - exact).max() <= 4 * EPS32 * scale
    plain = np.float64(jnp.matmul(states.hi, weights.hi, precision=jax.lax.Precision.HIGHEST))
    assert np.abs(plain - exact).max() > 1e4 * EPS32 * scale


def test_compensated_rejects_float64_and_bad_shapes():
    a = jnp.full((3,), 0.5, jnp.float32)
    with jax.enable_x64(True), pytest.raises(ValueError, match="float32 only"):
        lc.parallel_scan(jnp.full((3,), 0.5), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="shape"):
        lc.scan(a, jnp.zeros((1, 4, 2), jnp.float32))
    states = lc.split_float64(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="last axis"):
        lc.readout(states, lc.split_float64(np.zeros((4, 3))))


@pytest.mark.parametrize("chunk", [16, 4096])
def test_driven_final_state_matches_the_scan_x64(monkeypatch, chunk):
    """The decay-power matmul (chunked at ``chunk``: 50 = 3 x 16 + 2 pads at the front) gives
    the scan's last state; float64, so only round-off of ~50 terms separates them."""
    monkeypatch.setattr(lds, "FINAL_STATE_CHUNK", chunk)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        decays = jnp.asarray(np.stack([np.linspace(0.1, 0.999, 5), -np.linspace(0.2, 0.9, 5)]))
        drive = jnp.asarray(rng.standard_normal((2, 50, 3)))
        u = jnp.broadcast_to(drive[..., None, None], (2, 50, 3, 2, 5))
        x0 = jnp.asarray(rng.standard_normal((2, 3, 2, 5)))
        full = jnp.broadcast_to(decays, (3, 2, 5))
        expected = np.asarray(lds.scan(full, u)[:, -1])
        expected_from_x0 = np.asarray(lds.scan(full, u, x0)[:, -1])
        got = np.asarray(lds.driven_final_state(decays, drive))
        got_from_x0 = np.asarray(lds.driven_final_state(decays, drive, x0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13 * np.abs(expected).max())
    atol = 1e-13 * np.abs(expected_from_x0).max()
    np.testing.assert_allclose(got_from_x0, expected_from_x0, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="drive"):
        lds.driven_final_state(np.float32([0.5]), jnp.zeros((1, 4, 2), jnp.int32))
    with pytest.raises(ValueError, match="initial state"):
        lds.driven_final_state(np.float32([0.5]), jnp.zeros((1, 4, 2)), jnp.zeros((1, 2)))


def test_pairwise_sum_is_twice_as_precise():
    """Large cancelling float32 terms (odd count, so the tree pads): ``s + c`` (added in float64)
    is within ``2 depth u^2 sum |terms|`` of the exact sum (Sum2's bound, ``u = 2^-24``), where a
    plain float32 sum loses ~``u sum |terms|``."""
    rng = np.random.default_rng(7)
    terms = rng.standard_normal((2, 41, 3)).astype(np.float32) * 1e3
    terms[:, 20:40] = -terms[:, :20] * np.float32(1 + 2**-20)
    exact = terms.astype(np.float64).sum(axis=1)
    s, c = jax.jit(lc.pairwise_sum)(jnp.asarray(terms))
    got = np.float64(s) + np.float64(c)
    scale = np.abs(terms.astype(np.float64)).sum(axis=1)
    depth = 6  # ceil(log2(41)) levels of the tree
    assert np.all(np.abs(got - exact) <= 2 * depth * EPS32**2 * scale)
    plain = np.float64(jnp.sum(jnp.asarray(terms), axis=1))
    assert np.abs(plain - exact).max() > 1e3 * 2 * depth * EPS32**2 * scale.max()
