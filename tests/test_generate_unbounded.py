"""Generation without a length limit and with ragged batches.

* A distilled (LDS-only) model and a hybrid LDS + attention model decode 4x past ``max_len``; the
  logits of every decoded position equal a direct float64 evaluation of the same model (each LDS
  layer evaluated as explicit sums of decay powers, not by its recurrence).
* Models with STU layers refuse to run past ``max_len``, naming the layer (test_generate.py).
* Ragged batches (left-padded): each row's greedy tokens equal what the row alone generates, for
  an STU model, a hybrid and a distilled one.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.decode.generate import decode, generate, prefill
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.model import ModelConfig, SpectralModel

MAX_LEN = 24
LDS_ONLY = ModelConfig(
    d_model=16, num_layers=2, max_len=MAX_LEN, vocab_size=11, num_filters=4,
    stu_projection="tensordot",
)  # fmt: skip
HYBRID = dataclasses.replace(LDS_ONLY, layer_pattern="SA", num_heads=2, window=5)


def direct_lds(layer: LDSLayer, x: np.ndarray) -> np.ndarray:
    """A tensordot LDS layer without AR terms, by explicit sums in float64.

    x: [B, T, d_in] -> [B, T, d_out]. Unreduced (decays ``[S, n]``, the bank's states shared by
    every channel): ``y_t[o] = sum_j w[o, j] sum_{s<=t} a_j^(t-s) (x_s M_in)[o]`` with readout
    ``w`` (the sum of its stored words). Reduced per channel (real 2-state blocks ``p``, see
    :class:`~spectral_jax.ops.distilled_lds.ReducedLDS`): the lag-``k`` kernel of channel ``o`` is
    ``sum_p (wx, wy) [[Re mu1^k, -Im mu1^k], [Im mu1^k, Re mu2^k]] (1, e)``.
    """
    drive = x @ np.asarray(layer.M_in[...], np.float64)  # [B, T, C]
    t = np.arange(x.shape[1])
    lag = t[:, None] - t[None, :]  # [T, T]
    words = np.asarray(layer.readout[...], np.float64).sum(axis=0)  # one word (plain)
    if layer.config.blocks:  # reduced: per channel group, table [11, P * C_g], words [2, P * C_g]
        table = np.asarray(layer.decays[...], np.float64)
        kernel, start = np.zeros((*lag.shape, drive.shape[-1])), 0
        k = np.maximum(lag, 0)[..., None, None]  # [T, T, 1, 1]
        for channels, slots in layer.config.groups:
            stop = start + slots * len(channels)
            group = table[:, start:stop].reshape(-1, slots, len(channels))
            mu1, mu2 = group[0] + 1j * group[1], group[5] + 1j * group[6]  # [P, C_g]
            e = group[10]
            wx, wy = words[:, start:stop].reshape(2, slots, len(channels))
            p1, p2 = mu1**k, mu2**k  # [T, T, P, C_g]: the block's k-step map [[Re p1, -Im p1],
            # [Im p1, Re p2]] applied to its input (1, e), read out by (wx, wy)
            response = wx * (p1.real - p1.imag * e) + wy * (p1.imag + p2.real * e)
            kernel[..., list(channels)] = np.where(lag[..., None] >= 0, response.sum(axis=2), 0.0)
            start = stop
    else:  # the bank's decays [m], readout words [C, m, 1]
        a, w = np.asarray(layer.decays[...], np.float64).reshape(-1), words[..., 0]
        powers = np.where(lag[..., None] >= 0, a ** np.maximum(lag, 0)[..., None], 0.0)
        kernel = np.einsum("tsm,cm->tsc", powers, w)  # [T, T, C]
    return np.einsum("tsc,bsc->btc", kernel, drive)


def reference_logits(distilled: SpectralModel, tokens: np.ndarray) -> np.ndarray:
    """The distilled model's logits [B, T, V] in float64: its own embedding, norms, MLPs,
    attention (parallel path, float64 activations) and head, with :func:`direct_lds` mixers."""
    config = dataclasses.replace(distilled.config, dtype="float64")
    with jax.enable_x64(True):
        model64 = SpectralModel(config, rngs=nnx.Rngs(0))  # structure; parameters copied below
        for block64, block in zip(model64.blocks, distilled.blocks, strict=True):
            if isinstance(block.mixer, LDSLayer):
                block64.mixer = block.mixer
        nnx.update(model64, nnx.state(distilled, nnx.Param))
        h = model64.embed(jnp.asarray(tokens)).astype(jnp.float64)
        for block in model64.blocks:
            x = block.mixer_norm(h)
            if isinstance(block.mixer, LDSLayer):
                y = jnp.asarray(direct_lds(block.mixer, np.asarray(x)))
            else:
                y = block.mixer(x)
            h = h + y
            h = h + block.mlp(block.mlp_norm(h))
        h = model64.final_norm(h)
        return np.asarray(model64.head(h), np.float64)


@nnx.jit(static_argnums=2)
def decoded_logits(model, tokens, prompt_len):
    """Prefill ``tokens[:, :prompt_len]`` then step through the rest: logits [B, T, V]."""
    y0, cache = model.prefill(tokens[:, :prompt_len])
    _, ys = jax.lax.scan(model.step, cache, tokens[:, prompt_len:].T)
    return jnp.concatenate([y0, ys.swapaxes(0, 1)], axis=1)


def distilled_model(config, seed, reduce=True):
    """(model, its distillation): reduced per channel (the default) or keeping the bank's
    states (``reduce=False``)."""
    model = SpectralModel(config, rngs=nnx.Rngs(seed))
    tol = {} if reduce else {"tol": None}
    return model, distill_model(model, num_states=MAX_LEN, arithmetic="plain", **tol).model


@pytest.mark.parametrize(
    "config, reduce",
    [(LDS_ONLY, True), (HYBRID, False)],
    ids=["lds_only_reduced", "hybrid_lds_attention_unreduced"],
)
def test_decoding_past_max_len_equals_direct_float64_evaluation(config, reduce):
    model, distilled = distilled_model(config, seed=1, reduce=reduce)
    assert all(
        bool(b.mixer.config.blocks) == reduce
        for b in distilled.blocks
        if isinstance(b.mixer, LDSLayer)
    )
    assert model.length_limit == MAX_LEN and distilled.length_limit is None
    prompt = np.random.default_rng(2).integers(0, 11, (2, 8)).astype(np.int32)
    new = 4 * MAX_LEN
    tokens = np.asarray(generate(distilled, prompt, new))  # 8 + 96 positions > max_len = 24
    assert tokens.shape == (2, new)
    sequence = np.concatenate([prompt, tokens], axis=1)
    got = np.asarray(decoded_logits(distilled, jnp.asarray(sequence), 8))
    want = reference_logits(distilled, sequence)
    # Budget: plain float32 recurrences over T = 104 positions. Each state accumulates ~T
    # roundings of eps32 = 6e-8, growing like sqrt(T) * eps32 ~ 6e-7 relative to its size, which
    # the readout's cancelling coefficients and two blocks of width-16 matmuls can amplify by
    # ~10: 1e-5 of the logit scale. Measured: 3e-7 (LDS only), 5e-7 (hybrid).
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"decoded vs direct float64: {err:.2e} of the logit scale")
    assert err < 1e-5, err
    # greedy tokens are the argmax of the float64 logits (decoded position t predicts t + 1)
    np.testing.assert_array_equal(np.argmax(want[:, 7:-1], -1), tokens)


RAGGED = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5], [8, 9, 7, 9, 3]]


@pytest.mark.parametrize("kind", ["stu", "hybrid", "distilled_hybrid"])
def test_ragged_batch_rows_equal_each_row_alone(kind):
    config = dataclasses.replace(HYBRID, k_u=2, k_y=1) if kind != "stu" else LDS_ONLY
    model, distilled = distilled_model(config, seed=3)
    model = distilled if kind == "distilled_hybrid" else model
    batch = np.asarray(generate(model, RAGGED, 10))
    for i, row in enumerate(RAGGED):
        np.testing.assert_array_equal(batch[i], np.asarray(generate(model, [row], 10))[0])
    # the padded prefill gives each row's last logits to float32 accuracy, so equal greedy
    # tokens are not luck: compare with the margin of the decisions
    logits, _ = prefill(model, RAGGED)
    for i, row in enumerate(RAGGED):
        alone, _ = prefill(model, [row])
        np.testing.assert_allclose(logits[i], alone[0], atol=1e-5, rtol=1e-5)


def test_ragged_and_unbounded_together():
    """A left-padded batch decodes past max_len too, and the chunked decode agrees."""
    _, distilled = distilled_model(HYBRID, seed=4)
    logits, cache = prefill(distilled, RAGGED)
    assert int(cache.pos) == 8
    tokens = np.asarray(decode(distilled, cache, logits, 2 * MAX_LEN))
    for i, row in enumerate(RAGGED):
        np.testing.assert_array_equal(tokens[i], np.asarray(generate(distilled, [row], 48))[0])
