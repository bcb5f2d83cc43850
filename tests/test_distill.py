"""LDS bank fit, report, save/load and STU parameter conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.distill.bank import LDSBank, load_bank, save_bank
from spectral_jax.distill.convert import stu_to_lds
from spectral_jax.distill.fit import fit_lds_bank, target_filters
from spectral_jax.ops import lds

U32 = 2.0**-24  # float32 unit round-off
L, K, STATES = 128, 6, 40


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """Both variants at (L, K, STATES), fitted once for the module in its own cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return {v: fit_lds_bank(L, K, v, STATES) for v in ("standard", "hankel_l")}


@pytest.fixture
def small_bank(banks):
    return banks["standard"]


@pytest.fixture(scope="module")
def compensated_bank(tmp_path_factory):
    """The standard bank at (L, K, STATES) fitted for compensated arithmetic (its report holds
    the compensated float32 error)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return fit_lds_bank(L, K, "standard", STATES, arithmetic="compensated")


def test_fit_matches_filters_and_report_is_consistent(small_bank):
    bank, report = small_bank
    targets = target_filters(L, K, "standard")  # [L, 2K]: plus then minus
    approx = bank.filters()
    err = np.linalg.norm(approx - targets) / np.linalg.norm(targets)
    assert report["rel_fro_err"] == pytest.approx(err, rel=1e-6)
    assert report["max_abs_err"] == pytest.approx(np.abs(approx - targets).max(), rel=1e-6)
    # 40 states reach ~8e-9 at L=128, K=6 (the error falls geometrically with the states).
    assert err <= 3e-8
    assert bank.num_states == STATES and bank.num_filters == K and bank.decays.size == STATES // 2
    assert report["coeff_max_abs"] == pytest.approx(np.abs(bank.coeffs).max())
    assert report["fit_seconds"] > 0


def test_minus_branch_reuses_the_coefficients_exactly(small_bank):
    bank, _ = small_bank
    approx = bank.filters()
    sign = np.where(np.arange(L) % 2 == 0, 1.0, -1.0)[:, None]
    np.testing.assert_array_equal(approx[:, K:], sign * approx[:, :K])
    np.testing.assert_array_equal(bank.branch_decays(), np.stack([bank.decays, -bank.decays]))


def test_decays_are_float32_exact_and_stable(small_bank):
    bank, _ = small_bank
    assert np.all((bank.decays > 0) & (bank.decays < 1))
    np.testing.assert_array_equal(bank.decays.astype(np.float32).astype(np.float64), bank.decays)


def test_float32_report(small_bank, compensated_bank):
    """Plain float32 errors scale with round-off times the amplification; compensated ones sit
    at the float64 fit error plus a few round-offs. Each report measures only its own
    arithmetic."""
    _, report = small_bank
    assert report["rel_fro_err_f32"] <= report["rel_fro_err"] + 4 * U32 * report["amplification"]
    assert "rel_fro_err_f32_compensated" not in report
    _, report = compensated_bank
    assert report["rel_fro_err_f32_compensated"] <= report["rel_fro_err"] + 4 * U32
    assert "rel_fro_err_f32" not in report


def test_hankel_l_uses_signed_decays_in_one_branch(banks):
    bank, report = banks["hankel_l"]
    assert bank.num_branches == 1 and bank.num_states == STATES
    half = STATES // 2
    np.testing.assert_array_equal(bank.decays[half:], -bank.decays[:half])
    targets = target_filters(L, K, "hankel_l")
    assert report["rel_fro_err"] == pytest.approx(
        np.linalg.norm(bank.filters() - targets) / np.linalg.norm(targets), rel=1e-6
    )
    assert report["rel_fro_err"] <= 1e-9  # Hankel-L is easier: ~4e-11 here


def test_fit_is_deterministic_and_cached(private_cache, monkeypatch):
    bank, _ = fit_lds_bank(128, 4, "standard", 24)
    files = sorted(p.name for p in private_cache.iterdir())
    assert any(name.startswith("ldsbank-standard-L128-K4-n24") for name in files)
    monkeypatch.setenv("SPECTRAL_JAX_CACHE", "off")
    fresh, _ = fit_lds_bank(128, 4, "standard", 24)
    np.testing.assert_array_equal(fresh.decays, bank.decays)
    np.testing.assert_array_equal(fresh.coeffs, bank.coeffs)


def test_save_load_round_trip(small_bank, tmp_path):
    bank, report = small_bank
    path = tmp_path / "bank.npz"
    save_bank(path, bank)
    with np.load(path, allow_pickle=False) as data:  # pickle-free on disk
        assert set(data.files) == {"decays", "coeffs", "metadata"}
        assert json.loads(str(data["metadata"]))["report"] == report
    loaded = load_bank(path)
    np.testing.assert_array_equal(loaded.decays, bank.decays)
    np.testing.assert_array_equal(loaded.coeffs, bank.coeffs)
    assert (loaded.seq_len, loaded.variant) == (bank.seq_len, bank.variant)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an LDS bank"):
        load_bank(tmp_path / "other.npz")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"K": L}, "K must be"),
        ({"K": 0}, "K must be"),
        ({"num_states": 41}, "num_states"),
        ({"num_states": 2}, "num_states"),
        ({"num_states": 2 * L}, "num_states"),
        ({"variant": "other"}, "variant"),
        ({"ridge": -1.0}, "ridge"),
        ({"ridge": float("nan")}, "ridge"),
        ({"x_range": (1.0, -1.0)}, "x_range"),
        ({"arithmetic": "bf16"}, "arithmetic"),
        ({"L": 1}, "L must be"),
    ],
)
def test_bad_fit_arguments_raise(kwargs, match):
    args = {"L": L, "K": K, "variant": "standard", "num_states": STATES, **kwargs}
    length, k, variant, n = (args.pop(key) for key in ("L", "K", "variant", "num_states"))
    with pytest.raises(ValueError, match=match):
        fit_lds_bank(length, k, variant, n, **args)


def test_bad_banks_raise():
    good = np.array([0.5, 0.25])
    with pytest.raises(ValueError, match="open interval"):
        LDSBank(np.array([0.5, 1.0]), np.ones((2, 3)), 16, "standard")
    with pytest.raises(ValueError, match="NaN"):
        LDSBank(good, np.array([[1.0], [np.nan]]), 16, "standard")
    with pytest.raises(ValueError, match="float32"):
        LDSBank(np.array([0.1, 0.25]), np.ones((2, 3)), 16, "standard")
    with pytest.raises(ValueError, match="coeffs"):
        LDSBank(good, np.ones((3, 2)), 16, "standard")
    with pytest.raises(ValueError, match="variant"):
        LDSBank(good, np.ones((2, 2)), 16, "mystery")


def _stu_params(rng, K, d_in, d_out, projection, two_branch, k_u=2, k_y=1):
    tensordot = projection == "tensordot"
    names = ["M_filt_plus", "M_filt_minus"] if tensordot else ["M_plus", "M_minus"]
    names = names[: 1 + two_branch]
    shape = (K, d_out) if tensordot else (K, d_in, d_out)
    params = {name: rng.standard_normal(shape) for name in names}
    if tensordot:
        params["M_in"] = rng.standard_normal((d_in, d_out))
    params["M_u"] = rng.standard_normal((k_u, d_in, d_out))
    params["M_y"] = rng.standard_normal((k_y, d_out, d_out))
    return params


def test_stu_to_lds_full_and_tensordot(small_bank):
    bank, _ = small_bank
    rng = np.random.default_rng(0)
    full = _stu_params(rng, K, 3, 2, "full", two_branch=True)
    out = stu_to_lds(full, bank, "full")
    assert set(out) == set(full)
    for name in full:
        np.testing.assert_array_equal(out[name], full[name])
    td = _stu_params(rng, K, 3, 2, "tensordot", two_branch=True)
    out = stu_to_lds(td, bank, "tensordot")
    assert set(out) == {"M_in", "M_u", "M_y", "readout"}
    # readout[o, s, :] is the bank's LDS form of channel o's mixed filter in branch s.
    for s, name in enumerate(("M_filt_plus", "M_filt_minus")):
        np.testing.assert_allclose(out["readout"][:, s], (bank.coeffs @ td[name]).T, rtol=1e-14)
    mixed = bank.filters() @ np.concatenate([td["M_filt_plus"], td["M_filt_minus"]])
    with jax.enable_x64(True):
        responses = np.asarray(lds.impulse_response(jnp.asarray(bank.branch_decays()), L))
    np.testing.assert_allclose(
        np.einsum("tsn,osn->to", responses, out["readout"]), mixed, rtol=0, atol=1e-12
    )


def test_stu_to_lds_rejects_mismatches(banks):
    bank, _ = banks["standard"]
    rng = np.random.default_rng(1)
    one_branch = _stu_params(rng, K, 3, 2, "full", two_branch=False)
    with pytest.raises(ValueError, match="missing"):
        stu_to_lds(one_branch, bank, "full")
    wrong_k = _stu_params(rng, K - 1, 3, 2, "full", two_branch=True)
    with pytest.raises(ValueError, match=f"K={K}"):
        stu_to_lds(wrong_k, bank, "full")
    bad = _stu_params(rng, K, 3, 2, "tensordot", two_branch=True)
    bad["M_in"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stu_to_lds(bad, bank, "tensordot")
    hankel, _ = banks["hankel_l"]
    two = _stu_params(rng, K, 3, 2, "full", two_branch=True)
    with pytest.raises(ValueError, match="unexpected"):
        stu_to_lds(two, hankel, "full")


@pytest.mark.slow
def test_headline_accuracy_per_state():
    """Issue 3: L=8192, K=24, standard: <= 1e-8 over all 48 filters with <= 120 states."""
    _, report = fit_lds_bank(8192, 24, "standard", 120, arithmetic="compensated")
    assert report["rel_fro_err"] <= 1e-8
    assert report["rel_fro_err_f32_compensated"] <= 1e-6
