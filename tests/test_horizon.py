"""Bounded memory horizons (spectral_jax.nn.horizon): staggered restarts of STU and distilled LDS
layers and the exact cutoff of LDS layers, against float64 NumPy windowed convolutions and
against their own decode paths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.horizon import CutoffMixer, HorizonMixer, parse_horizon, set_horizon
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.mixer import DecodeOptions
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.ops.filters import spectral_filters

L, D, K = 16, 4, 4
EPS32 = float(np.finfo(np.float32).eps)


def _stu() -> STU:
    config = STUConfig(d_in=D, d_out=D, max_len=L, num_filters=K, projection="tensordot")
    return STU(config, rngs=nnx.Rngs(0))


def _windowed_reference(stu: STU, x: np.ndarray, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy ``y_t = sum_{j <= t - s(t)} k_j h_{t-j}`` with ``s(t)`` the restart of the
    copy read at ``t``; also ``sum |k_j| |h_{t-j}|`` (the scale of its round-off)."""
    p = {k: np.asarray(v, np.float64) for k, v in stu.params().items()}
    phi = np.asarray(spectral_filters(L, K, "standard")[0], np.float64)
    sign = np.where(np.arange(L) % 2 == 0, 1.0, -1.0)[:, None]
    kernels = np.concatenate([phi, sign * phi], 1) @ np.concatenate(
        [p["M_filt_plus"], p["M_filt_minus"]]
    )  # [L, C]
    h, h_abs = x @ p["M_in"], np.abs(x) @ np.abs(p["M_in"])  # [B, T, C]
    block = L // copies
    y, scale = np.zeros_like(h), np.zeros_like(h)
    for t in range(x.shape[1]):
        start = max(0, (t // block - copies + 1) * block)
        taps = kernels[: t - start + 1]  # k_0 .. k_{t - start}
        y[:, t] = np.einsum("jc,bjc->bc", taps, h[:, t - np.arange(taps.shape[0])])
        scale[:, t] = np.einsum("jc,bjc->bc", np.abs(taps), h_abs[:, t - np.arange(len(taps))])
    return y, scale


@nnx.jit(static_argnames="options")
def _stepped(layer, x, options):
    """Every position of ``x [B, T, D]`` by ``step`` from an empty cache -> ``[B, T, D]``."""
    cache = layer.init_cache(x.shape[0], L, x.dtype, options)
    _, ys = jax.lax.scan(layer.step, cache, x.swapaxes(0, 1))
    return ys.swapaxes(0, 1)


@pytest.mark.parametrize("copies, strategy", [(2, "futurefill"), (4, "naive")])
def test_restart_equals_float64_windowed_convolution(copies, strategy):
    stu = _stu()
    layer = HorizonMixer(stu, f"restart:{copies}")
    x = np.random.default_rng(copies).normal(size=(2, 3 * L + 5, D))  # T > L, T % (L / R) != 0
    ref, scale = _windowed_reference(stu, x, copies)
    xf = jnp.asarray(x, jnp.float32)
    stepped = np.asarray(
        _stepped(layer, xf, DecodeOptions(strategy=strategy, block_len=4)), np.float64
    )
    parallel = np.asarray(layer(xf), np.float64)
    # Round-off budget: float32 inputs and parameters (1 rounding each), the D-term input
    # projection, then up to L products summed (the naive step's window sums; the FFT path
    # needs fewer), so |error| <= (2 + D + L) eps32 * sum |k_j| |h_{t-j}|.
    budget = (2 + D + L) * EPS32 * scale
    assert np.all(np.abs(stepped - ref) <= budget)
    assert np.all(np.abs(parallel - ref) <= budget)
    # inside the first window the outputs are the unbounded layer's
    first = np.asarray(stu(xf[:, :L]), np.float64)
    assert np.all(np.abs(parallel[:, :L] - first) <= 2 * budget[:, :L])


def _model(horizon: str, distill: bool = False) -> SpectralModel:
    """A hybrid model under ``horizon`` (``cutoff``: set after distilling, as distill does)."""
    config = ModelConfig(
        d_model=8, num_layers=2, max_len=L, vocab_size=11, layer_pattern="SA", num_filters=K,
        stu_projection="tensordot", window=8, horizon="none" if horizon == "cutoff" else horizon,
    )  # fmt: skip
    model = SpectralModel(config, rngs=nnx.Rngs(1))
    model = distill_model(model, num_states=8).model if distill else model
    return set_horizon(model, horizon) if horizon == "cutoff" else model


def test_cutoff_equals_float64_convolution_over_the_last_L_inputs():
    lds = LDSLayer.from_stu(_stu(), num_states=8)  # reduced per channel (the default)
    layer = CutoffMixer(lds)
    x = np.random.default_rng(5).normal(size=(2, 3 * L + 5, D))
    kernels = np.asarray(lds.kernels[...], np.float64)[:L]  # the layer's own impulse response
    m_in = np.asarray(lds.M_in[...], np.float64)
    h, h_abs = x @ m_in, np.abs(x) @ np.abs(m_in)
    ref, scale = np.zeros_like(h), np.zeros_like(h)
    for t in range(x.shape[1]):
        lags = np.arange(min(L, t + 1))
        ref[:, t] = np.einsum("jc,bjc->bc", kernels[lags], h[:, t - lags])
        scale[:, t] = np.einsum("jc,bjc->bc", np.abs(kernels[lags]), h_abs[:, t - lags])
    xf = jnp.asarray(x, jnp.float32)
    y = np.asarray(_stepped(layer, xf, DecodeOptions()), np.float64)
    # Budget as for the restart test, times the bank's amplification (its cancelling
    # coefficients scale the states' round-off: fit_lds_bank's report), since the two states'
    # readouts are subtracted.
    amplification = fit_lds_bank(L, K, "standard", 8)[1]["amplification"]
    budget = (2 + D + L) * EPS32 * max(1.0, amplification) * scale
    assert np.all(np.abs(y - ref) <= budget)
    # inside the first window the outputs are the layer's own
    uncut = np.asarray(_stepped(lds, xf[:, :L], DecodeOptions()), np.float64)
    assert np.all(np.abs(y[:, :L] - uncut) <= budget[:, :L])
    np.testing.assert_array_equal(np.asarray(layer(xf)), y)  # the parallel path steps too


@pytest.mark.parametrize(
    "horizon, distill", [("restart:4", False), ("restart:4", True), ("cutoff", True)],
    ids=["stu-restart", "lds-restart", "lds-cutoff"],
)  # fmt: skip
def test_ragged_prefill_then_step_equals_one_pass_and_stepping(horizon, distill):
    model = _model(horizon, distill)
    assert model.length_limit is None
    assert isinstance(model.blocks[0].mixer, CutoffMixer if horizon == "cutoff" else HorizonMixer)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 11, size=(2, 3 * L - 1)))
    pad = jnp.asarray([0, 5])
    tokens = tokens.at[1, :5].set(0)
    head = 2 * L + 5  # prompt longer than L, not a multiple of L / R = 4
    one_pass = DecodeOptions(strategy="naive", prefill_chunk=None)
    full, _ = nnx.jit(lambda m, x: m.prefill(x, one_pass, pad))(model, tokens)
    chunked = DecodeOptions(strategy="naive", prefill_chunk=L)  # later chunks are stepped

    @nnx.jit
    def prompt_then_steps(m, x):
        y, cache = m.prefill(x[:, :head], chunked, pad)
        cache, ys = jax.lax.scan(m.step, cache, x[:, head:].T)
        return y, ys.swapaxes(0, 1)

    y_prompt, y_steps = prompt_then_steps(model, tokens)
    scale = float(jnp.max(jnp.abs(full)))
    # float32 logits from a few hundred roundings deep on each path: 1e3 eps32 of their scale
    tol = 1e3 * EPS32 * scale
    real = np.arange(head)[None, :, None] >= np.asarray(pad)[:, None, None]  # outputs at pads
    np.testing.assert_allclose(  # are meaningless
        np.where(real, y_prompt, 0), np.where(real, full[:, :head], 0), atol=tol, rtol=0
    )
    np.testing.assert_allclose(y_steps, full[:, head:], atol=tol, rtol=0)

    @nnx.jit
    def steps(m, x):
        _, ys = jax.lax.scan(m.step, m.init_cache(1, options=chunked), x.T)
        return ys.swapaxes(0, 1)

    np.testing.assert_allclose(steps(model, tokens[:1]), full[:1], atol=tol, rtol=0)


def test_policies_and_limits():
    assert _model("none").length_limit == L
    assert parse_horizon("restart:4").copies == 4
    for bad in ("restart:1", "restart:x", "restart", "cutof", "cutoff:2", "", 3):
        with pytest.raises(ValueError, match="horizon must be"):
            parse_horizon(bad)
    with pytest.raises(ValueError, match="divisible by 3"):
        _model("restart:3")
    with pytest.raises(ValueError, match="STU has no response past L"):
        SpectralModel(
            dataclasses.replace(_model("none").config, horizon="cutoff"), rngs=nnx.Rngs(0)
        )
