"""Carried-state training: windows that continue from the previous window's caches.

* ``SpectralModel.prefill(x2, cache=c1)`` after ``prefill(x1) -> c1`` gives the outputs of one
  prefill of ``x1 ++ x2``, for a distilled (LDS-only) model and a distilled hybrid with
  sliding-window attention whose window reaches back across the boundary.
* The second window's loss has no gradient in what made the carried cache (the first window's
  parameters), while without ``stop_cache`` it has: the check is not vacuous.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.data.tasks import Batch
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.train.step import carried_loss_and_grads

L = 16  # one window
LDS_ONLY = ModelConfig(
    d_model=16, num_layers=2, max_len=L, vocab_size=11, num_filters=4,
    stu_projection="tensordot",
)  # fmt: skip
HYBRID = dataclasses.replace(LDS_ONLY, layer_pattern="SA", num_heads=2, window=5)


def distilled(config: ModelConfig) -> SpectralModel:
    model = SpectralModel(config, rngs=nnx.Rngs(1))
    return distill_model(model, num_states=L, arithmetic="plain").model


@pytest.fixture(scope="module", params=[LDS_ONLY, HYBRID], ids=["lds_only", "hybrid_attention"])
def model(request):
    return distilled(request.param)


TOKENS = np.random.default_rng(0).integers(0, 11, (2, 2 * L)).astype(np.int32)


def test_two_carried_windows_equal_one_prefill_of_both(model):
    assert model.length_limit is None  # distilled: windows may follow each other without end
    tokens = jnp.asarray(TOKENS)
    whole, whole_cache = model.prefill(tokens)
    first, cache = model.prefill(tokens[:, :L])
    second, carried = model.prefill(tokens[:, L:], cache=cache)
    assert int(carried.pos) == 2 * L == int(whole_cache.pos)
    got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
    # Budget: float32 throughout. The second window's LDS outputs are the FFT convolution of the
    # window plus the carried state's free response instead of one FFT over 2L = 32 positions:
    # the same sums associated differently, each off by ~log2(2L) * eps32 ~ 3e-7 relative to
    # the largest term; two blocks of width-16 matmuls and the head can amplify that by ~10:
    # 1e-5 of the logit scale (test_generate_unbounded.py measured 3e-7 .. 5e-7 for the like).
    scale = np.max(np.abs(np.asarray(whole)))
    err = np.max(np.abs(got - np.asarray(whole))) / scale
    print(f"carried windows vs one prefill: {err:.2e} of the logit scale")
    assert err < 1e-5, err
    # the caches agree too (same budget, relative to each leaf's largest entry), so a third
    # window would continue alike; LDS states may be complex
    for a, b in zip(jax.tree.leaves(carried), jax.tree.leaves(whole_cache), strict=True):
        a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(initial=1.0))


def window_losses(model):
    """``(first_params, second_params) -> loss`` of window 2 (under ``second_params``) run from
    the cache that window 1 left (under ``first_params``): by ``carried_loss_and_grads``, given
    the cache unstopped, and the same loss with no stop at all (a plain ``prefill``)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(TOKENS)
    half = L // 2
    window = Batch(tokens[:, half:L], tokens[:, half + 1 : L + 1], jnp.ones((2, half)))
    build = lambda params: nnx.merge(graphdef, params, rest, copy=True)  # noqa: E731

    def carried(first_params, second_params):
        _, cache = build(first_params).prefill(tokens[:, :half])
        return carried_loss_and_grads(build(second_params), window, cache, "tokens")[0]

    def leaky(first_params, second_params):
        _, cache = build(first_params).prefill(tokens[:, :half])
        outputs, _ = build(second_params).prefill(window.inputs, cache=cache)
        logp = jax.nn.log_softmax(outputs)
        return -jnp.mean(jnp.take_along_axis(logp, window.targets[..., None], -1))

    return carried, leaky


def test_second_window_gradient_does_not_reach_the_first(model):
    params = nnx.state(model, nnx.Param)
    carried, leaky = window_losses(model)
    through_cache = jax.jit(jax.grad(carried))(params, params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(through_cache))
    # control: without a stop, the first window's parameters do reach window 2's loss
    leaked = jax.jit(jax.grad(leaky))(params, params)
    assert max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(leaked)) > 0
    # and the carried loss is that loss (the stop changes gradients, not values): float32
    # round-off of one masked mean of 16 terms, ~1e-6 relative
    values = jax.jit(lambda p: (carried(p, p), leaky(p, p)))(params)
    np.testing.assert_allclose(*values, rtol=1e-6)
