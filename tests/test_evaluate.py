"""Streaming evaluation: chunked losses with carried state equal the parallel forward's; STU
models refuse streams longer than max_len; a distilled model reads past it."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.decode.evaluate import bits_per_byte, stream_losses
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.train.step import per_position_loss

CONFIG = ModelConfig(
    d_model=16, num_layers=2, max_len=16, vocab_size=11, layer_pattern="SA", num_filters=4,
    stu_projection="tensordot", num_heads=2, window=4,
)  # fmt: skip
# float32: the step path and the FFT path differ by ~1e-6 of O(1) logits (test_generate's
# TOL32 = 1e-5 bounds the logits); cross-entropy is 1-Lipschitz in the logits.
TOL32 = 1e-5


def test_chunked_stream_losses_equal_the_forward_pass():
    model = SpectralModel(CONFIG, rngs=nnx.Rngs(0))
    streams = np.random.default_rng(0).integers(0, 11, (2, 17)).astype(np.int32)
    losses = stream_losses(model, streams, chunk=5)  # chunks 5, 5, 5, 1: state carried
    assert losses.shape == (2, 16)
    logits = model(jnp.asarray(streams[:, :-1]))
    want = np.asarray(per_position_loss(logits, jnp.asarray(streams[:, 1:]), "tokens"))
    np.testing.assert_allclose(losses, want, atol=TOL32, rtol=TOL32)
    assert bits_per_byte(losses) == pytest.approx(float(np.mean(want)) / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match=r"a stream of 20 positions needs 20 positions"):
        stream_losses(model, np.zeros((1, 21), np.int32))


def test_an_attention_only_model_reads_past_max_len():
    model = SpectralModel(dataclasses.replace(CONFIG, attention_only=True), rngs=nnx.Rngs(1))
    streams = np.random.default_rng(1).integers(0, 11, (1, 49)).astype(np.int32)
    losses = stream_losses(model, streams, chunk=16)  # 3 x max_len
    logits = model(jnp.asarray(streams[:, :-1]))  # the parallel path has no limit either
    want = np.asarray(per_position_loss(logits, jnp.asarray(streams[:, 1:]), "tokens"))
    np.testing.assert_allclose(losses, want, atol=TOL32, rtol=TOL32)
