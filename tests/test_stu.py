"""STU layer against a direct-convolution evaluation of the same formula."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_ar_output
from flax import nnx

from spectral_jax.nn.stu import STU, STUConfig

MODES = list(itertools.product(["standard", "hankel_l"], ["full", "tensordot"]))


def direct_stu(p, phi, u, variant, projection):
    """The STU formula evaluated literally in float64 NumPy: explicit sums over lags and filters,
    explicit AR recursions. ``p``: parameter arrays; ``phi: [L, K]``; ``u: [B, L, d_in]``."""
    B, L, _ = u.shape
    signs = (-1.0) ** np.arange(L)
    branches = [(phi, "plus")] + (
        [(phi * signs[:, None], "minus")] if variant == "standard" else []
    )
    d_out = p["M_in"].shape[1] if projection == "tensordot" else p["M_plus"].shape[2]
    y = np.zeros((B, L, d_out))
    for t in range(L):
        for s in range(t + 1):
            for filt, name in branches:
                if projection == "full":
                    y[:, t] += np.einsum("k,bd,kdo->bo", filt[s], u[:, t - s], p[f"M_{name}"])
                else:
                    v = u[:, t - s] @ p["M_in"]
                    y[:, t] += v * (filt[s] @ p[f"M_filt_{name}"])
        for i in range(p["M_u"].shape[0] if "M_u" in p else 0):
            if t - i >= 0:
                y[:, t] += u[:, t - i] @ p["M_u"][i]
        for i in range(1, p["M_y"].shape[0] + 1 if "M_y" in p else 1):
            if t - i >= 0:
                y[:, t] += y[:, t - i] @ p["M_y"][i - 1]
    return y


@pytest.mark.parametrize(("variant", "projection"), MODES)
def test_stu_matches_direct_formula_float64(variant, projection):
    with jax.enable_x64(True):
        cfg = STUConfig(
            d_in=3,
            d_out=2,
            max_len=32,
            num_filters=6,
            variant=variant,
            projection=projection,
            k_u=2,
            k_y=2,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        layer = STU(cfg, rngs=nnx.Rngs(0))
        randomize_ar_output(layer, jax.random.key(1))
        u = np.random.default_rng(2).standard_normal((2, 20, 3))  # shorter than max_len
        y = np.asarray(layer(jnp.asarray(u)))
        p = {k: np.asarray(v) for k, v in layer.params().items()}
        ref = direct_stu(p, np.asarray(layer.filters[...])[:20], u, variant, projection)
    assert np.linalg.norm(y - ref) <= 1e-12 * np.linalg.norm(ref)


@pytest.mark.parametrize(("variant", "projection"), MODES)
def test_stu_float32_and_jit_grad(variant, projection):
    cfg = STUConfig(
        d_in=4, d_out=3, max_len=64, num_filters=8, variant=variant, projection=projection, k_u=1
    )
    layer = STU(cfg, rngs=nnx.Rngs(0))
    u = np.random.default_rng(0).standard_normal((2, 64, 4)).astype(np.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(u))
    assert y.dtype == jnp.float32
    p = {k: np.asarray(v, np.float64) for k, v in layer.params().items()}
    ref = direct_stu(
        p, np.asarray(layer.filters[...], np.float64), u.astype(np.float64), variant, projection
    )
    # float32 inputs/params and FFT of size 128: relative error ~ a few eps32 * log2(128).
    assert np.linalg.norm(np.asarray(y) - ref) <= 2e-6 * np.linalg.norm(ref)

    grads = nnx.grad(lambda m: jnp.mean(m(jnp.asarray(u)) ** 2))(layer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(
        bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in leaves
    )
    assert "filters" not in nnx.state(grads, nnx.Param)  # the filters are not trained


def test_bfloat16_activations_keep_float32_params():
    cfg = STUConfig(d_in=4, d_out=4, max_len=64, num_filters=8, dtype=jnp.bfloat16)
    layer = STU(cfg, rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.float32 for v in layer.params().values())
    u = jax.random.normal(jax.random.key(0), (1, 64, 4))
    y = layer(u)
    ref = STU(STUConfig(d_in=4, d_out=4, max_len=64, num_filters=8), rngs=nnx.Rngs(0))(u)
    assert y.dtype == jnp.bfloat16
    # bf16 input and output rounding (2^-8 each) bound the error.
    assert jnp.linalg.norm(y.astype(jnp.float32) - ref) <= 1e-2 * jnp.linalg.norm(ref)


def test_stu_is_causal():
    layer = STU(STUConfig(d_in=2, d_out=2, max_len=32, num_filters=4, k_u=2), rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(0), (1, 32, 2))
    y1 = layer(u)
    y2 = layer(u.at[:, 20:].set(0.0))
    np.testing.assert_allclose(y1[:, :20], y2[:, :20], atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((16, 4), r"expects input \[batch, length, 4\]"),
        ((1, 16, 5), "expects 4 input features, got 5"),
        ((1, 33, 4), r"input length 33 is outside \[1, max_len=32\]"),
    ],
)
def test_bad_inputs_raise(shape, match):
    layer = STU(STUConfig(d_in=4, d_out=4, max_len=32, num_filters=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        layer(jnp.ones(shape))
    with pytest.raises(ValueError, match="floating-point input"):
        layer(jnp.ones((1, 8, 4), jnp.int32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_in": 0}, "d_in must be an integer >= 1"),
        ({"max_len": 1}, "max_len must be an integer >= 2"),
        ({"num_filters": 40}, "num_filters=40 exceeds 32"),
        ({"variant": "hankel"}, "variant must be one of"),
        ({"projection": "outer"}, "projection must be one of"),
        ({"k_y": -1}, "k_y must be an integer >= 0"),
        ({"dtype": jnp.int32}, "dtype must be one of"),
    ],
)
def test_bad_config_raises(kwargs, match):
    base = {"d_in": 4, "d_out": 4, "max_len": 32, "num_filters": 4}
    with pytest.raises(ValueError, match=match):
        STUConfig(**{**base, **kwargs})


def test_shared_filters_must_match():
    from spectral_jax.nn.stu import make_filters

    shared = make_filters(STUConfig(d_in=2, d_out=2, max_len=32, num_filters=4))
    with pytest.raises(ValueError, match="shared filters have shape"):
        STU(STUConfig(d_in=2, d_out=2, max_len=64, num_filters=4), rngs=nnx.Rngs(0), filters=shared)
