"""Streaming evaluation: next-token loss over one long stream, chunk by chunk with carried state.

A model with no length limit (distilled LDS layers, sliding-window attention) can read a stream
far longer than the sequences it was trained on. :func:`stream_losses` feeds the stream through
``model.step`` one jitted ``lax.scan`` of ``chunk`` tokens at a time, carrying the decode cache
from chunk to chunk, so memory stays constant whatever the stream's length; a model with STU
layers can read at most its ``max_len`` tokens (:meth:`SpectralModel.check_length` says so).

:func:`bits_per_byte` summarises the losses of a stream prefix or segment.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.validation import positive_int


@functools.partial(jax.jit, static_argnames="graphdef")
def _chunk_losses(graphdef, state, cache, inputs, targets):
    """inputs, targets: [B, C] -> (cache after the chunk, losses [B, C] in nats)."""
    model = nnx.merge(graphdef, state)

    def advance(cache, io):
        token, target = io
        cache, logits = model.step(cache, token)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)
        return cache, loss

    cache, losses = jax.lax.scan(advance, cache, (inputs.T, targets.T))
    return cache, losses.T


def stream_losses(
    model: nnx.Module,
    streams: np.ndarray,
    *,
    chunk: int = 256,
    options: DecodeOptions = DEFAULT_DECODE,
) -> np.ndarray:
    """Loss of predicting each next token of ``streams: [B, T + 1]`` int from all before it.

    Returns ``[B, T]`` float losses in nats: entry ``t`` is ``-log p(streams[:, t + 1] |
    streams[:, :t + 1])``. The stream is read ``chunk`` tokens per jitted call with the cache
    carried over (the last chunk may be shorter and compiles once more). Raises ValueError if
    a layer cannot run ``T`` positions (STU layers past their ``max_len``).
    """
    streams = np.asarray(streams)
    if streams.ndim != 2 or streams.shape[1] < 2 or not np.issubdtype(streams.dtype, np.integer):
        raise ValueError(f"streams must be int [B, T + 1] with T >= 1, got {streams.shape}")
    positive_int("stream_losses", "chunk", chunk)
    batch, length = streams.shape[0], streams.shape[1] - 1
    model.check_length(length, f"a stream of {length} positions")
    limit = model.length_limit
    cache = model.init_cache(batch, length if limit is None else limit, options=options)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(streams, jnp.int32)
    losses = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        cache, part = _chunk_losses(
            graphdef, state, cache, tokens[:, start:stop], tokens[:, start + 1 : stop + 1]
        )
        losses.append(np.asarray(part))
    return np.concatenate(losses, axis=1)


def bits_per_byte(losses: np.ndarray) -> float:
    """Mean loss in bits of ``losses`` (nats, any shape), for byte-level models bits/byte."""
    return float(np.mean(losses) / math.log(2))
