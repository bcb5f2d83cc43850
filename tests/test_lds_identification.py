"""The LDS-identification experiment (experiments/lds_identification.py) at a tiny size."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "lds_identification", REPO / "experiments" / "lds_identification.py"
)
lid = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lid  # dataclasses look their module up there
_spec.loader.exec_module(lid)

EPS32 = float(np.finfo(np.float32).eps)
TINY = lid.ExperimentConfig(
    seq_len=128, d_in=2, d_out=2, state_dim=8, steps=4, batch=2, seeds=1, num_filters=8
)


def test_true_impulse_response_reproduces_the_task_outputs():
    """The data's noise-free targets are the causal convolution of the inputs with G."""
    task = dataclasses.replace(TINY, seq_len=32).task(0.0, seed=3)
    g = lid.true_impulse_response(task)  # [L, d_out, d_in]
    batch = task.batch(0, 0, [0, 1])
    u = batch.inputs.astype(np.float64)
    expected = np.stack(
        [np.einsum("soi,bsi->bo", g[t::-1], u[:, : t + 1]) for t in range(task.seq_len)], axis=1
    )
    # targets are float32 roundings of float64 sums of at most L terms
    np.testing.assert_allclose(batch.targets, expected, atol=64 * EPS32 * np.abs(expected).max())


def test_noise_levels_share_inputs():
    """heldout_mse compares against clean outputs of the same inputs."""
    noisy, clean = (TINY.task(s, 0).batch(0, 1, [0, 1], "eval") for s in (0.5, 0.0))
    np.testing.assert_array_equal(noisy.inputs, clean.inputs)
    assert not np.array_equal(noisy.targets, clean.targets)


def test_diagonal_lds_impulse_response_and_decoding():
    model = lid.DiagonalLDS(3, 2, 5, 0.99, rngs=nnx.Rngs(0))
    length = 40
    a = np.tanh(np.asarray(model.theta[...], np.float64))
    b, c = (np.asarray(p[...], np.float64) for p in (model.B, model.C))
    expected = np.einsum("tn,on,ni->toi", a[None] ** np.arange(length)[:, None], c, b)
    got = lid.impulse_response(lid.batched_apply(model, chunk=2), 3, length)
    # float32 recurrence: relative error ~ eps * (length + d) per entry
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=4 * (length + 5) * EPS32 * scale)

    x = jax.random.normal(jax.random.key(1), (2, length, 3))
    y, last = model.prefill(x)
    cache = model.init_cache(2, length, jnp.float32)
    steps = []
    for t in range(length):
        cache, y_t = model.step(cache, x[:, t])
        steps.append(y_t)
    tol = 4 * (length + 5) * EPS32 * float(jnp.abs(y).max())
    np.testing.assert_allclose(np.stack(steps, axis=1), y, atol=tol)
    np.testing.assert_allclose(cache, last, atol=tol)
    np.testing.assert_allclose(model(x), y)


def test_log_interval_and_steps_to_threshold():
    same = np.full((3, 4), 0.5)
    for band in lid.log_interval(same):
        np.testing.assert_allclose(band, same[0])
    mean, lo, hi = lid.log_interval(np.exp(np.array([[-1.0], [1.0]])))
    t975 = 12.706204736174  # Student t, 1 degree of freedom, 97.5%; std of logs = sqrt(2)
    np.testing.assert_allclose([mean[0], lo[0], hi[0]], [1.0, math.exp(-t975), math.exp(t975)])

    curves = np.tile(np.linspace(1.0, 0.0, 100), (2, 1))  # mse at step s: 1 - (s-1)/99
    # running mean over 2 steps ending at step s: 1 - (s - 1.5)/99 <= 0.25 + 0.1 first at s = 66
    assert lid.steps_to_threshold(curves, floor=0.25, threshold=0.1) == 66
    assert lid.steps_to_threshold(curves, floor=0.0, threshold=1e-3) is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"delta": 0.0}, "delta"),
        ({"seeds": 0}, "seeds"),
        ({"learning_rates": (0.1, 0.1)}, "learning_rates"),
        ({"noise_stds": ()}, "noise_stds"),
        ({"attn_window": 0}, "attn_window"),
        ({"thresholds": (-1.0,)}, "thresholds"),
    ],
)
def test_config_rejects_bad_values(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **change)


def test_command_line_configs():
    config, _ = lid.parse_args(["--paper", "--steps", "7"])
    assert (config.seq_len, config.batch, config.d_in, config.d_out) == (8192, 32, 100, 100)
    assert config.steps == 7
    config, out = lid.parse_args(["--d", "3", "--out", "elsewhere"])
    assert (config.d_in, config.d_out, config.seq_len, out) == (
        3,
        3,
        1024,
        pathlib.Path("elsewhere"),
    )
    with pytest.raises(ValueError, match="seeds"):
        lid.parse_args(["--seeds", "0"])


def test_tiny_experiment_writes_every_output(tmp_path):
    config = dataclasses.replace(TINY, noise_stds=(0.5,))
    rows = lid.run_experiment(config, tmp_path)
    assert [r["method"] for r in rows] == ["stu", "lds", "attention", "distilled"]
    by_method = {r["method"]: r for r in rows}
    for row in rows:
        assert math.isfinite(row["heldout_mse"]) and row["heldout_mse"] > 0
    # The distilled layer (float32, compensated) reproduces the float32 FFT STU: the FFT path's
    # relative error is ~eps32 * log2(FFT size) ~ 1e-6, the distillation's ~1e-7.
    assert by_method["distilled"]["impulse_rel_diff_vs_stu"] < 1e-5
    stu_mse, distilled_mse = by_method["stu"]["heldout_mse"], by_method["distilled"]["heldout_mse"]
    assert abs(distilled_mse - stu_mse) < 1e-5 * stu_mse + 1e-6

    curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert curves[0].split(",")[:4] == ["noise_std", "method", "step", "mse_mean"]
    assert len(curves) == 1 + len(lid.METHODS) * config.steps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["seq_len"] == config.seq_len and len(summary["rows"]) == 4
    assert (tmp_path / "final_mse.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
