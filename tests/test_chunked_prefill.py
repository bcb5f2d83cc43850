"""Chunked prefill: a prompt run chunk by chunk, each layer continuing from the cache the previous
chunk left, gives the one-pass prefill's outputs and cache, and the steps after it agree.

Tiny models (d_model 16, two layers, vocab 11) of each kind, a prompt of 23 positions that no
chunk divides, a ragged batch whose padding runs past the first chunk, chunks shorter and longer
than the attention window (5). One jitted comparison per model: every chunking's prefill and the
steps after it are traced into one program.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_ar_output
from flax import nnx

from spectral_jax.decode import generate as gen
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.mixer import DecodeOptions
from spectral_jax.nn.model import ModelConfig, SpectralModel

LENGTH, STEPS = 23, 3
BASE = ModelConfig(
    d_model=16, num_layers=2, max_len=32, vocab_size=11, num_filters=4, num_heads=2, window=5,
    stu_projection="tensordot", k_u=2, k_y=1,
)  # fmt: skip
PAD = np.asarray([0, 9])  # row 1: 9 pad positions, past a first chunk of 3 or 7
# Budget: float32, the same sums in another order (FFTs of a chunk's length instead of the
# prompt's, the carried LDS state's free response, attention's blocks cut elsewhere): each output
# rounds ~log2(32) * eps32 = 3e-7 relative to the sizes of its terms, which the LDS readout's
# cancelling coefficients can amplify ~10x, over two layers and the head: 1e-5 of each array's
# scale. Measured: <= 5e-7 (outputs) and <= 1e-6 (caches) of the scale.
REL = 1e-5


def make(kind: str) -> SpectralModel:
    config = {
        "attention": dataclasses.replace(BASE, attention_only=True),
        "distilled": BASE,
        "distilled_hybrid": dataclasses.replace(BASE, layer_pattern="SA"),
    }[kind]
    model = randomize_ar_output(SpectralModel(config, rngs=nnx.Rngs(1)), jax.random.key(2))
    if kind.startswith("distilled"):
        model = distill_model(model, num_states=32, arithmetic="plain").model
    return model


@nnx.jit(static_argnums=3)
def prefill_and_steps(model, tokens, pad, chunks):
    """For each chunk size in ``chunks`` (None: one pass): (outputs [B, L, V] of the prompt
    tokens[:, :LENGTH], the cache, and the logits [B, STEPS, V] of stepping tokens[:, LENGTH:]
    from it)."""
    results = []
    for chunk in chunks:
        y, cache = model.prefill(tokens[:, :LENGTH], DecodeOptions(prefill_chunk=chunk), pad)
        _, steps = jax.lax.scan(model.step, cache, tokens[:, LENGTH:].T)
        results.append((y, cache, steps.swapaxes(0, 1)))
    return results


def assert_close(got, want, what):
    """Each leaf within REL of ``want``'s scale (integers exactly)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(b.dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=what)
        else:
            err = np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30)
            assert err <= REL, f"{what}: {err:.2e} of the scale"


@pytest.mark.parametrize(
    "kind, chunks, ragged",
    [
        ("attention", (1, 3), True),  # chunk 1; 3 < window: the prefix is the ring buffer
        ("distilled", (7,), False),  # 3 chunks, then 2 positions
        ("distilled_hybrid", (7,), True),
    ],
)
def test_chunked_prefill_equals_one_pass(kind, chunks, ragged):
    model = make(kind)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, LENGTH + STEPS)), jnp.int32)
    pad = jnp.asarray(PAD) if ragged else None
    (want, want_cache, want_steps), *chunked = prefill_and_steps(
        model, tokens, pad, (None, *chunks)
    )
    real = np.arange(LENGTH)[None, :, None] >= (PAD if ragged else 0 * PAD)[:, None, None]
    for chunk, (y, cache, steps) in zip(chunks, chunked, strict=True):
        what = f"{kind}, chunk {chunk}"
        assert_close(np.where(real, y, 0), np.where(real, want, 0), f"{what}: outputs")
        assert int(cache.pos) == LENGTH
        assert_close(cache, want_cache, f"{what}: cache")
        assert_close(steps, want_steps, f"{what}: steps")


def test_generate_prefill_forms_only_the_last_logits_in_chunks():
    """generate's prefill (outputs="last") of a ragged batch, chunked, gives the last logits
    of the one-pass prefill of all outputs."""
    model = make("attention")
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1]]
    tokens, pad = gen.prompt_batch(rows)
    want, _ = nnx.jit(lambda m, t, p: m.prefill(t, DecodeOptions(prefill_chunk=None), p))(
        model, tokens, pad
    )
    got, cache = gen.prefill(model, rows, DecodeOptions(prefill_chunk=4))
    assert got.shape == (2, BASE.vocab_size) and int(cache.pos) == 9
    assert_close(got, want[:, -1], "generate.prefill")


def test_bad_prefill_chunk_and_outputs_raise():
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1, got 0"):
        DecodeOptions(prefill_chunk=0)
    model = make("attention")
    with pytest.raises(ValueError, match="outputs must be one of"):
        model.prefill(jnp.zeros((1, 4), jnp.int32), outputs="first")
