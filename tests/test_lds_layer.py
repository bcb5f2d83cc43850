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
from conftest import randomize_ar_output
from flax import nnx

from spectral_jax.distill.bank import load_bank, save_bank
from spectral_jax.distill.convert import stu_to_lds
from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_config import LDSConfig
from spectral_jax.nn.lds_layer import LDSCache, LDSLayer, distill_stu
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.ops import lds_compensated as lc
from spectral_jax.ops import lds_continuation

U32 = 2.0**-24
U64 = 2.0**-53
L, K, STATES, D_IN, D_OUT, B = 128, 6, 40, 3, 2, 2


@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory):
    """A cache directory holding both variants' banks at (L, K, STATES), fitted once."""
    directory = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_JAX_CACHE", str(directory))
        for variant in ("standard", "hankel_l"):
            fit_lds_bank(L, K, variant, STATES)
    return directory


@pytest.fixture
def banks(bank_cache, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_CACHE", str(bank_cache))
    return {v: fit_lds_bank(L, K, v, STATES) for v in ("standard", "hankel_l")}


def make_stu(projection, variant, dtype=jnp.float32, seed=0):
    cfg = STUConfig(
        D_IN, D_OUT, L, K, variant, projection, k_u=2, k_y=2, dtype=dtype, param_dtype=dtype
    )
    return randomize_ar_output(STU(cfg, rngs=nnx.Rngs(seed)), jax.random.key(seed + 7))


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
        layer, reduction = distill_stu(stu, bank, arithmetic=arithmetic)
        y = layer(x)
        assert y.shape == (B, L, D_OUT) and y.dtype == jnp.float32
        # a reduced layer (tensordot, plain) adds its channels' measured kernel error, which
        # the outputs inherit like the bank's
        reduced = 0.0 if reduction is None else reduction["error_max"]
        budget = 2 * (report["rel_fro_err"] + reduced) + 2 * np.sqrt(L) * U32 * c
        err = relative(y, reference)
        assert err <= budget, f"{arithmetic}: {err:.2e} > {budget:.2e}"


@pytest.mark.parametrize("projection", ["full", "tensordot"])
def test_prefill_and_steps_reproduce_call_x64(banks, projection):
    """In float64 (plain arithmetic) every path is the same recurrence: FFT prefill, both scans
    and steps agree to float64 round-off (``sqrt(T) u64`` per state, times the amplification)
    also past the bank's length."""
    bank, report = banks["standard"]
    T = L + 37
    with jax.enable_x64(True):
        stu = make_stu(projection, "standard", dtype=jnp.float64)
        layer = LDSLayer.from_stu(stu, bank, arithmetic="plain")
        x = jnp.asarray(inputs(T), jnp.float64)
        full = np.asarray(layer(x, scan="sequential"))
        paths = {
            "fft": np.asarray(layer(x)),
            "parallel": np.asarray(layer(x, scan="parallel")),
            "steps": decode_after_prefill(layer, x, 100, "fft"),
        }
    atol = 4 * np.sqrt(T) * U64 * report["amplification"] * np.abs(full).max()
    for name, y in paths.items():
        np.testing.assert_allclose(y, full, rtol=0, atol=atol, err_msg=name)


STEP = nnx.jit(lambda layer, cache, x_t: layer.step(cache, x_t))
CALL = nnx.jit(lambda layer, x, scan: layer(x, scan=scan), static_argnums=2)


def decode_after_prefill(layer, x, prompt_len, scan):
    """Outputs ``[B, T, d_out]``: prefill of the first ``prompt_len`` positions, then steps."""
    y, cache = layer.prefill(x[:, :prompt_len], scan=scan)
    ys = [np.asarray(y)]
    for t in range(prompt_len, x.shape[1]):
        cache, y_t = STEP(layer, cache, x[:, t])
        ys.append(np.asarray(y_t)[:, None])
    return np.concatenate(ys, 1)


@pytest.mark.parametrize(
    ("projection", "arithmetic"), [("full", "plain"), ("tensordot", "compensated")]
)
def test_fft_prefill_equals_scans_and_steps_float32(banks, projection, arithmetic):
    """FFT prefill == parallel scan == sequential scan == step-by-step decoding, in float32, for a
    sequence longer than the bank (``L + 37``: the part past the kernels continues by scan).

    Tolerance (relative Frobenius, each path against the sequential scan): all paths compute
    the same system; a state sums up to ``T`` terms (round-off ``<= sqrt(T) u32`` of its size)
    and the readout multiplies that by ``c``: the bank's amplification for plain float32, 1 for
    compensated (error-free readout); the FFT with float64-formed kernels is within
    ``log2(n) u32`` (smaller). Budget: ``2 sqrt(T) u32 c``.
    """
    bank, report = banks["standard"]
    layer = LDSLayer.from_stu(make_stu(projection, "standard"), bank, arithmetic=arithmetic)
    T = L + 37
    x = inputs(T)
    c = report["amplification"] if arithmetic == "plain" else 1.0
    budget = 2 * np.sqrt(T) * U32 * c
    reference = np.asarray(CALL(layer, x, "sequential"), np.float64)
    paths = {
        "fft": CALL(layer, x, "fft"),
        "parallel": CALL(layer, x, "parallel"),
        "fft prefill + steps": decode_after_prefill(layer, x, 100, "fft"),
        "long fft prefill + steps": decode_after_prefill(layer, x, L + 20, "fft"),
    }
    for name, y in paths.items():
        assert relative(y, reference) <= budget, f"{name}: {relative(y, reference):.2e}"


@pytest.mark.parametrize(
    ("projection", "arithmetic", "block"),
    [
        ("tensordot", "plain", 16),
        ("full", "plain", 16),
        ("tensordot", "compensated", 16),
        ("tensordot", "plain", None),  # blocks of the kernels' length (L < TAIL_BLOCK)
    ],
)
def test_long_prompts_continue_block_by_block(banks, projection, arithmetic, block, monkeypatch):
    """Past the kernels, the prompt continues in blocks (memory bounded by the block; plain:
    FFT convolution plus the carried state's free response, compensated: the pair scan). Three
    whole blocks and a remainder give the sequential scan's outputs and final state, within the
    budget of :func:`test_fft_prefill_equals_scans_and_steps_float32`."""
    bank, report = banks["standard"]
    layer = LDSLayer.from_stu(make_stu(projection, "standard"), bank, arithmetic=arithmetic)
    if block is not None:
        monkeypatch.setattr(lds_continuation, "TAIL_BLOCK", block)
    size = min(lds_continuation.TAIL_BLOCK, L)
    T = L + 3 * size + 5
    x = inputs(T)
    c = report["amplification"] if arithmetic == "plain" else 1.0
    budget = 2 * np.sqrt(T) * U32 * c
    y, cache = layer.prefill(x)  # eager: traced with the small block
    reference, reference_cache = layer.prefill(x, scan="sequential")
    assert relative(y, reference) <= budget

    def values(state):  # hi + lo of a compensated state; each group's array of a reduced one
        if isinstance(state, lc.DoubleFloat):
            state = np.asarray(state.hi, np.float64) + np.asarray(state.lo, np.float64)
        parts = [np.asarray(s, np.complex128).ravel() for s in jax.tree.leaves(state)]
        return np.concatenate([f(np.concatenate(parts)) for f in (np.real, np.imag)])

    assert relative(values(cache.state), values(reference_cache.state)) <= budget


def test_steps_from_init_cache_reproduce_call_float32(banks):
    """Compensated float32 (tensordot, AR terms): the step path and the two-scan parallel path
    agree to a few float32 round-offs of the output (their states agree to ~1e-13)."""
    bank, _ = banks["standard"]
    layer = LDSLayer.from_stu(make_stu("tensordot", "standard"), bank, arithmetic="compensated")
    x = inputs()
    full = np.asarray(layer(x, scan="parallel"))
    cache = layer.init_cache(B, L, jnp.float32)
    assert isinstance(cache, LDSCache) and isinstance(cache.state, lc.DoubleFloat)
    assert cache.state.hi.shape == (B, D_OUT, 2, STATES // 2)
    ys = []
    for t in range(L):
        cache, y_t = STEP(layer, cache, x[:, t])
        ys.append(np.asarray(y_t))
    np.testing.assert_allclose(np.stack(ys, 1), full, rtol=0, atol=8 * U32 * np.abs(full).max())


def test_layer_from_saved_bank_is_identical(banks, tmp_path):
    bank, _ = banks["standard"]
    save_bank(tmp_path / "bank.npz", bank)
    stu = make_stu("full", "standard")
    x = inputs()
    a = LDSLayer.from_stu(stu, bank)(x)
    b = LDSLayer.from_stu(stu, load_bank(tmp_path / "bank.npz"))(x)
    np.testing.assert_array_equal(a, b)


def test_distill_model_replaces_every_stu(banks):
    _, report = banks["standard"]  # distill_model finds this bank in the cache
    cfg = ModelConfig(d_model=D_IN, num_layers=2, max_len=L, vocab_size=11, num_filters=K)
    model = SpectralModel(cfg, rngs=nnx.Rngs(0))
    distilled, bank_reports = distill_model(model, num_states=STATES)
    assert [(b["L"], b["K"], b["variant"], b["layers"]) for b in bank_reports] == [
        (L, K, "standard", 2)
    ]  # both layers share one bank, reported once
    assert bank_reports[0]["rel_fro_err"] == report["rel_fro_err"]
    assert all(isinstance(b.mixer, LDSLayer) for b in distilled.blocks)
    assert all(isinstance(b.mixer, STU) for b in model.blocks)  # the input model is unchanged
    tokens = jax.random.randint(jax.random.key(0), (B, L), 0, 11)
    y_stu, y_lds = np.asarray(model(tokens)), np.asarray(distilled(tokens))
    # Two layers, each within its budget; norms and MLPs pass relative errors through. The
    # parallel path is the FFT with float64-formed kernels: no amplification.
    budget = 2 * (2 * report["rel_fro_err"] + 2 * np.sqrt(L) * U32)
    assert relative(y_lds, y_stu) <= budget
    _, cache = distilled.prefill(tokens[:, :100])
    cache, y_t = distilled.step(cache, tokens[:, 100])
    # One plain step reads its states with cancelling coefficients: amplified round-off.
    atol = 2 * np.sqrt(L) * U32 * report["amplification"] * np.abs(y_lds).max()
    np.testing.assert_allclose(y_t, y_lds[:, 100], rtol=0, atol=atol)
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
    with pytest.raises(ValueError, match="expects input"):
        layer(jnp.zeros((B, 0, D_IN)))
    with pytest.raises(ValueError, match="scan"):
        layer(jnp.zeros((B, 8, D_IN)), scan="fast")
    assert layer.length_limit is None  # no max_len: longer inputs are tested above
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
    params = stu_to_lds(make_stu("full", "standard").params(), bank, "full")
    params["M_u"] = params["M_u"][:1]
    with pytest.raises(ValueError, match="M_u must have shape"):
        LDSLayer(layer.config, bank, params)


@pytest.mark.parametrize(
    ("stu_kwargs", "arithmetic", "match"),
    [
        ({}, "fast", "arithmetic"),
        ({"param_dtype": jnp.float64}, "compensated", "compensated"),
        ({"param_dtype": jnp.bfloat16}, "plain", "param_dtype"),
    ],
)
def test_bad_configs_raise(stu_kwargs, arithmetic, match):
    with pytest.raises(ValueError, match=match):
        LDSConfig(STUConfig(2, 2, 16, 4, **stu_kwargs), arithmetic)
    with pytest.raises(ValueError, match="STUConfig"):
        LDSConfig({"d_in": 2}, "plain")


def test_config_follows_the_stu():
    """The LDS config is the STU's plus the arithmetic; which parameters exist follows from it."""
    stu = STUConfig(2, 3, 16, 4, "hankel_l", "full", k_u=2, param_dtype=jnp.float64)
    assert LDSConfig.for_stu(stu).stu is stu and LDSConfig.for_stu(stu).arithmetic == "plain"
    compensated = LDSConfig.for_stu(stu, "compensated")
    assert compensated.stu.param_dtype == jnp.float32 and compensated.stu.d_out == 3
    assert set(compensated.param_shapes(4)) == {"M_plus", "M_u"}
    tensordot = LDSConfig(STUConfig(2, 3, 16, 4, projection="tensordot", k_y=1))
    assert tensordot.param_shapes(4) == {"M_in": (2, 3), "M_y": (1, 3, 3)}
    assert tensordot.channels == 3


@pytest.mark.slow
def test_plain_layer_matches_float64_stu_at_issue_scale():
    """The default arithmetic at scale (experiments/bench_distill.py's fidelity problem: L=8192,
    K=24, 120 states, standard, full mode, d=8, B=1): a plain float32 distilled layer is within
    3e-5 relative of the float64 STU, over its FFT prefill and over the recurrence that decoding
    runs (the sequential scan: the same float32 operations as ``step``)."""
    length, filters, width = 8192, 24, 8
    bank, report = fit_lds_bank(length, filters, "standard", 120)
    assert bank.metadata["arithmetic"] == "plain"  # the default fit is the plain one
    stu = STU(STUConfig(width, width, length, filters), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, length, width), jnp.float32)
    reference = stu64_reference(stu, x)
    layer = LDSLayer.from_stu(stu, bank)
    errors = {scan: relative(CALL(layer, x, scan), reference) for scan in ("fft", "sequential")}
    print(f"plain float32 vs float64 STU: {errors}, bank f64 error {report['rel_fro_err']:.2e}")
    assert max(errors.values()) <= 3e-5, errors
