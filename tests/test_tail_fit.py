"""Bank-side horizons (spectral_jax.distill.fit.TailOptions): the tail-penalised fit and the
eigenvalue cap bound the bank's impulse response past L; the distillation horizon parser."""

import numpy as np
import pytest

from spectral_jax.distill.fit import TailOptions, fit_lds_bank
from spectral_jax.nn.horizon import parse_distill_horizon

L, K, STATES = 32, 8, 24  # the plain bank's tail holds 3% of its in-window energy


def test_tail_report_measures_the_bank_past_its_window():
    bank, report = fit_lds_bank(L, K, "standard", STATES)
    tail = bank.tail_report(multiple=4)
    filters = bank.filters(4 * L)
    assert tail["tail_energy_ratio"] == pytest.approx(
        np.sum(filters[L:] ** 2) / np.sum(filters[:L] ** 2), rel=1e-12
    )
    # the in-window error is the fit's own relative error (both in float64)
    assert tail["in_window_error"] == pytest.approx(report["rel_fro_err"], rel=1e-6)


@pytest.mark.parametrize("tail", [TailOptions(weight=1.0), TailOptions(cap=1e-2)])
def test_tail_options_lower_the_tail_energy(tail):
    plain = fit_lds_bank(L, K, "standard", STATES)[0].tail_report()
    bank, _ = fit_lds_bank(L, K, "standard", STATES, tail=tail)
    bounded = bank.tail_report()
    assert bounded["tail_energy_ratio"] < plain["tail_energy_ratio"] / 5
    # the trade: a bounded tail costs accuracy inside the window, but the filters stay fitted
    assert plain["in_window_error"] < bounded["in_window_error"] < 0.05
    if tail.cap is not None:
        # each decay is rounded to float32 (relative 2^-24), which moves a^L by up to L 2^-24
        assert np.max(np.abs(bank.decays)) ** L <= tail.cap * (1 + L * 2.0**-24)
    assert bank.metadata["tail"]["weight"] == tail.weight


def test_distill_horizon_syntax():
    assert parse_distill_horizon("none") == ("none", TailOptions())
    assert parse_distill_horizon("restart:2") == ("restart:2", TailOptions())
    assert parse_distill_horizon("cutoff") == ("cutoff", TailOptions())
    assert parse_distill_horizon("tail:0.5") == ("none", TailOptions(weight=0.5))
    assert parse_distill_horizon("cap:1e-3") == ("none", TailOptions(cap=1e-3))
    for bad in ("tail:0", "tail:-1", "tail:", "cap:2", "cap:x", "restart:1", "cutoff:1", "Tail:1"):
        with pytest.raises(ValueError, match="distillation horizon must be"):
            parse_distill_horizon(bad)
    with pytest.raises(ValueError, match=r"TailOptions\.cap"):
        TailOptions(cap=0.0)
