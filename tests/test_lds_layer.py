"""The distilled LDS layer against the STU it comes from, and its decode entry points.

Error budget of a distilled float32 layer against the float64 STU (relative Frobenius error of
the outputs, random parameters and inputs):

    budget = 2 * rel_fro_err + 2 * sqrt(L) * u32 * c,

where ``rel_fro_err`` is the bank's float64 fit error (the output error inherits it: the outputs
are random combinations of the filter outputs), ``u32 = 2^-24``, ``2 sqrt(L) u32`` bounds the
float32 rounding of length-L causal sums, and ``c`` is 1 for compensated arithmetic and the
bank's amplification (cancellation of its coefficients) for plain float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax import distill
from spectral_jax.nn.lds_layer import LDSCache, LDSConfig, LDSLayer, distill_model
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig

U32 = 2.0**-24
L, K, STATES, D_IN, D_OUT, B = 128, 6, 40, 3, 2, 2


@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory):
    """A cache directory holding both variants' banks at (L, K, STATES), fitted once."""
    directory = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_JAX_CACHE", str(directory))
        for variant in ("standard", "hankel_l"):
            distill.fit_lds_bank(L, K, variant, STATES)
    return directory


@pytest.fixture
def banks(bank_cache, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_CACHE", str(bank_cache))
    return {v: distill.fit_lds_bank(L, K, v, STATES) for v in ("standard", "hankel_l")}


def make_stu(projection, variant, dtype=jnp.float32, seed=0):
    cfg = STUConfig(
        D_IN, D_OUT, L, K, variant, projection, k_u=2, k_y=2, dtype=dtype, param_dtype=dtype
    )
    stu = STU(cfg, rngs=nnx.Rngs(seed))
    # M_y starts at zero; give the output recurrence something to do (stable: small gain).
    stu.M_y[...] = 0.2 * jax.random.normal(jax.random.key(seed + 7), stu.M_y.shape, dtype)
    return stu


def stu64_reference(stu, x):
    """The same STU evaluated in float64."""
    with jax.enable_x64(True):
        cfg = stu.config
        cfg64 = STUConfig(
            cfg.d_in, cfg.d_out, cfg.max_len, cfg.num_filters, cfg.variant, cfg.projection,
            cfg.k_u, cfg.k_y, dtype=jnp.float64, param_dtype=jnp.float64,
        )  # fmt: skip
        stu64 = STU(cfg64, rngs=nnx.Rngs(0))
        for name, value in stu.params().items():
            getattr(stu64, name)[...] = jnp.asarray(value, jnp.float64)
        return np.asarray(stu64(jnp.asarray(x, jnp.float64)))


def inputs(length=L, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, length, D_IN), jnp.float32)


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("projection", "variant"),
    [("full", "standard"), ("tensordot", "standard"), ("full", "hankel_l")],
)
def test_distilled_layer_matches_float64_stu(banks, projection, variant):
    bank, report = banks[variant]
    stu = make_stu(projection, variant)
    x = inputs()
    reference = stu64_reference(stu, x)
    for arithmetic, c in (("compensated", 1.0), ("plain", report["amplification"])):
        layer = LDSLayer.from_stu(stu, bank, arithmetic=arithmetic)
        y = layer(x)
        assert y.shape == (B, L, D_OUT) and y.dtype == jnp.float32
        budget = 2 * report["rel_fro_err"] + 2 * np.sqrt(L) * U32 * c
        err = relative(y, reference)
        assert err <= budget, f"{arithmetic}: {err:.2e} > {budget:.2e}"


def test_prefill_and_steps_reproduce_call_x64(banks):
    """In float64 (plain arithmetic) every decode path is the same recurrence: tight match."""
    bank, _ = banks["standard"]
    with jax.enable_x64(True):
        stu = make_stu("full", "standard", dtype=jnp.float64)
        layer = LDSLayer.from_stu(stu, bank, arithmetic="plain")
        x = jnp.asarray(inputs(), jnp.float64)
        full = np.asarray(layer(x))
        y_pre, cache = layer.prefill(x[:, :100])
        ys = [np.asarray(y_pre)]
        step = nnx.jit(lambda layer, cache, x_t: layer.step(cache, x_t))
        for t in range(100, L):
            cache, y_t = step(layer, cache, x[:, t])
            ys.append(np.asarray(y_t)[:, None])
    np.testing.assert_allclose(np.concatenate(ys, 1), full, rtol=0, atol=1e-12 * np.abs(full).max())


def test_steps_from_init_cache_reproduce_call_float32(banks):
    """Compensated float32 (tensordot, AR terms): the step path and the two-scan parallel path
    agree to a few float32 round-offs of the output (their states agree to ~1e-13)."""
    bank, _ = banks["standard"]
    layer = LDSLayer.from_stu(make_stu("tensordot", "standard"), bank)
    x = inputs()
    full = np.asarray(layer(x))
    cache = layer.init_cache(B, L, jnp.float32)
    assert isinstance(cache, LDSCache) and cache.state_hi.shape == (B, D_OUT, 2, STATES // 2)
    step = nnx.jit(lambda layer, cache, x_t: layer.step(cache, x_t))
    ys = []
    for t in range(L):
        cache, y_t = step(layer, cache, x[:, t])
        ys.append(np.asarray(y_t))
    np.testing.assert_allclose(np.stack(ys, 1), full, rtol=0, atol=8 * U32 * np.abs(full).max())


def test_layer_from_saved_bank_is_identical(banks, tmp_path):
    bank, _ = banks["standard"]
    distill.save_bank(tmp_path / "bank.npz", bank)
    stu = make_stu("full", "standard")
    x = inputs()
    a = LDSLayer.from_stu(stu, bank)(x)
    b = LDSLayer.from_stu(stu, distill.load_bank(tmp_path / "bank.npz"))(x)
    np.testing.assert_array_equal(a, b)


def test_distill_model_replaces_every_stu(banks):
    _, report = banks["standard"]  # distill_model finds this bank in the cache
    cfg = ModelConfig(d_model=D_IN, num_layers=2, max_len=L, vocab_size=11, num_filters=K)
    model = SpectralModel(cfg, rngs=nnx.Rngs(0))
    distilled = distill_model(model, num_states=STATES)
    assert all(isinstance(b.mixer, LDSLayer) for b in distilled.blocks)
    assert all(isinstance(b.mixer, STU) for b in model.blocks)  # the input model is unchanged
    tokens = jax.random.randint(jax.random.key(0), (B, L), 0, 11)
    y_stu, y_lds = np.asarray(model(tokens)), np.asarray(distilled(tokens))
    # Two layers, each within its budget; norms and MLPs pass relative errors through.
    budget = 2 * (2 * report["rel_fro_err"] + 2 * np.sqrt(L) * U32)
    assert relative(y_lds, y_stu) <= budget
    _, cache = distilled.prefill(tokens[:, :100])
    cache, y_t = distilled.step(cache, tokens[:, 100])
    np.testing.assert_allclose(y_t, y_lds[:, 100], rtol=0, atol=8 * U32 * np.abs(y_lds).max())
    attention = SpectralModel(
        ModelConfig(
            d_model=8, num_layers=1, max_len=16, vocab_size=5, attention_only=True, num_heads=2
        ),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match="no STU"):
        distill_model(attention)


def test_bad_inputs_raise(banks):
    bank, _ = banks["standard"]
    layer = LDSLayer.from_stu(make_stu("full", "standard"), bank)
    with pytest.raises(ValueError, match="expects input"):
        layer(jnp.zeros((B, 8, D_IN + 1)))
    with pytest.raises(ValueError, match="expects input"):
        layer(jnp.zeros((8, D_IN)))
    with pytest.raises(ValueError, match="max_len"):
        layer(jnp.zeros((B, L + 1, D_IN)))
    with pytest.raises(ValueError, match="floating"):
        layer(jnp.zeros((B, 8, D_IN), jnp.int32))
    cache = layer.init_cache(B, L)
    with pytest.raises(ValueError, match="expects input"):
        layer.step(cache, jnp.zeros((B, 1, D_IN)))
    with pytest.raises(ValueError, match="batch"):
        layer.init_cache(0, L)
    hankel, _ = banks["hankel_l"]
    with pytest.raises(ValueError, match="does not match"):
        LDSLayer.from_stu(make_stu("full", "standard"), hankel)
    params = distill.stu_to_lds(make_stu("full", "standard").params(), bank, tensordot=False)
    params["M_u"] = params["M_u"][:1]
    with pytest.raises(ValueError, match="M_u must have shape"):
        LDSLayer(layer.config, bank, params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arithmetic": "fast"}, "arithmetic"),
        ({"projection": "diagonal"}, "projection"),
        ({"param_dtype": jnp.float64}, "compensated"),
        ({"param_dtype": jnp.int32, "arithmetic": "plain"}, "param_dtype"),
        ({"d_in": 0}, "d_in"),
        ({"k_y": -1}, "k_y"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LDSConfig(**{"d_in": 2, "d_out": 2, "max_len": 16, **kwargs})
