"""The train step's loss and gradients: accumulation over microbatches == the full batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.data.tasks import Batch
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.train.step import (
    loss_and_grads,
    masked_mean,
    per_position_loss,
    split_microbatches,
)

# float64 throughout: the accumulated sum differs from the full-batch sum only in the order
# of additions (4 partial sums of 2 x 12 positions), ~1e-16 relative per addition.
TOL64 = 1e-12

HYBRID = ModelConfig(
    d_model=16, num_layers=2, max_len=16, vocab_size=11, layer_pattern="SA",
    num_filters=4, num_heads=2, window=4, dtype="float64",
)  # fmt: skip


def _batch(rows: int, length: int) -> Batch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (rows, length + 1))
    # uneven weights per row (some rows count no position at all): a per-microbatch mean
    # would weight the slices wrongly, the full-batch weight does not
    mask = (rng.random((rows, length)) < np.linspace(0.0, 1.0, rows)[:, None]).astype(np.float64)
    return Batch(jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(mask))


def test_split_microbatches_interleaves_rows():
    batch = Batch(*(jnp.arange(8)[:, None] * jnp.ones((1, 3)),) * 3)
    micro = split_microbatches(batch, 4)
    assert micro.inputs.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro.inputs[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="8 rows does not split into 3 microbatches"):
        split_microbatches(batch, 3)


def test_four_microbatches_equal_the_full_batch_float64():
    with jax.enable_x64(True):
        model = SpectralModel(HYBRID, rngs=nnx.Rngs(0))
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model)))
        batch = _batch(8, 12)
        assert float(jnp.sum(batch.mask[:2])) != float(jnp.sum(batch.mask[2:4]))

        def full_loss(model):
            outputs = model(batch.inputs)
            return masked_mean(per_position_loss(outputs, batch.targets, "tokens"), batch.mask)

        want_loss, want_grads = nnx.jit(nnx.value_and_grad(full_loss))(model)
        step = nnx.jit(loss_and_grads, static_argnums=(2, 3))
        for microbatches in (1, 4):
            loss, grads = step(model, batch, "tokens", microbatches)
            np.testing.assert_allclose(loss, want_loss, rtol=TOL64)
            got, want = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
            assert len(got) == len(want) > 10
            for g, w in zip(got, want, strict=True):
                assert g.dtype == jnp.float64
                scale = float(jnp.max(jnp.abs(w)))
                np.testing.assert_allclose(g, w, rtol=TOL64, atol=TOL64 * scale)


def test_state_updated_by_the_call_is_carried_through_the_microbatches():
    class Counting(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 5)))
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls[...] += 1
            return x @ self.w[...]

    model = Counting()
    batch = Batch(jnp.ones((4, 2, 3)), jnp.zeros((4, 2, 5)), jnp.ones((4, 2)))
    loss, grads = loss_and_grads(model, batch, "regression", microbatches=4)
    assert int(model.calls[...]) == 4
    np.testing.assert_allclose(loss, 9.0)  # (x @ w)^2 = 9 everywhere
    np.testing.assert_allclose(grads["w"][...], np.full((3, 5), 2 * 3 / 5))  # d mean / dw


def test_microbatches_must_divide_the_batch():
    from spectral_jax.data.lm_tasks import ByteCorpusLM
    from spectral_jax.train import TrainConfig

    with pytest.raises(ValueError, match="global_batch=6 must be a multiple of microbatches=4"):
        TrainConfig(task=ByteCorpusLM(), global_batch=6, microbatches=4)
    with pytest.raises(ValueError, match=r"TrainConfig\.microbatches must be an integer >= 1"):
        dataclasses.replace(TrainConfig(task=ByteCorpusLM()), microbatches=0)
