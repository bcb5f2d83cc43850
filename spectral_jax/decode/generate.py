"""Autoregressive generation from a token model: a jitted prefill, then a jitted decode loop.

The decode loop runs entirely inside ``lax.scan`` (one compiled program for all new tokens; no
Python work per token). Each layer keeps its own explicit cache, built once by the prefill from
the :class:`~spectral_jax.nn.mixer.DecodeOptions` given here: STU layers decode with the
``naive`` or ``futurefill`` strategy (:mod:`spectral_jax.ops.conv_decode`); a distilled model's
LDS layers decode in ``O(1)`` per token whatever the strategy.

Length limits belong to the layers (``model.length_limit``): a model with STU layers stops at
their ``max_len``; a distilled or attention-only model decodes any number of tokens with
constant-size caches, past the length it was trained at.

Prompts of different lengths share one batch: they are left-padded, and the model zeroes the
residual stream at pad positions and masks them in attention, so that each row generates what it
would generate alone.

The model is any module with ``config.vocab_size``, ``check_length(n, what)``, ``prefill(tokens
[B, L], options, pad, outputs="last") -> (logits of the last position [B, V], cache)`` with
``cache.pos`` and ``step(cache, tokens [B]) -> (cache, logits [B, V])``, e.g.
:class:`spectral_jax.nn.model.SpectralModel`, whose prefill runs a long prompt in chunks of
``options.prefill_chunk`` positions and never forms the other positions' logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.validation import finite_float, positive_int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    temperature: 0 for greedy decoding (argmax, no randomness); > 0 samples from
      ``softmax(logits / temperature)``.
    top_k: 0 keeps every token; ``k > 0`` samples among the ``k`` largest logits only
      (needs ``temperature > 0``).
    """

    temperature: float = 0.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t = finite_float("Sampling", "temperature", self.temperature)
        k = positive_int("Sampling", "top_k", self.top_k, minimum=0)
        if k and t == 0.0:
            raise ValueError(f"Sampling.top_k={k} needs temperature > 0 (temperature 0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens from ``logits: [B, V]`` -> ``[B]`` int32 (``key`` unused when greedy)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(scaled, k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def prompt_batch(prompt_tokens: Any) -> tuple[jax.Array, jax.Array | None]:
    """Prompts as one left-padded batch: ``(tokens [B, L] int32, pad [B] int32 or None)``.

    ``prompt_tokens``: an int array ``[B, L]``, or a list of ``B`` token lists of any lengths
    ``>= 1``; shorter rows are left-padded with token 0 to the longest, and ``pad[b]`` counts
    row ``b``'s pad positions (None when every row has the same length).
    """
    if isinstance(prompt_tokens, list | tuple) and prompt_tokens:
        rows = [np.asarray(p) for p in prompt_tokens]
        if any(r.ndim != 1 or r.size < 1 or not np.issubdtype(r.dtype, np.integer) for r in rows):
            raise ValueError(
                "prompt_tokens must be int [B, L], or a list of non-empty lists of int tokens"
            )
        lengths = np.asarray([r.size for r in rows])
        longest = int(lengths.max())
        if np.all(lengths == longest):
            return jnp.asarray(np.stack(rows), jnp.int32), None
        tokens = np.zeros((len(rows), longest), np.int32)
        for i, r in enumerate(rows):
            tokens[i, longest - r.size :] = r
        return jnp.asarray(tokens), jnp.asarray(longest - lengths, jnp.int32)
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be int [B, L], got {prompt.dtype} {prompt.shape}")
    return prompt.astype(jnp.int32), None


def _check_num_tokens(num_tokens: Any) -> None:
    positive_int("", "number of new tokens", num_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def _prefill(graphdef, state, prompt, pad, options: DecodeOptions):
    return nnx.merge(graphdef, state).prefill(prompt, options, pad, outputs="last")


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "sampling"))
def _decode(graphdef, state, cache, logits, key, num_tokens: int, sampling: Sampling):
    """``num_tokens`` tokens from ``logits``; returns ``(tokens [B, n], cache)`` where the cache
    has consumed every token but the last (feeding it would need one more position)."""
    model = nnx.merge(graphdef, state)
    keys = jax.random.split(key, num_tokens)
    first = sample_tokens(logits, keys[0], sampling)

    def advance(carry, key_t):
        cache, token = carry
        cache, logits = model.step(cache, token)
        token = sample_tokens(logits, key_t, sampling)
        return (cache, token), token

    (cache, _), rest = jax.lax.scan(advance, (cache, first), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1), cache


@functools.partial(jax.jit, static_argnames="graphdef")
def _feed(graphdef, state, cache, tokens):
    return nnx.merge(graphdef, state).step(cache, tokens)


def prefill(model: nnx.Module, prompt_tokens: Any, options: DecodeOptions = DEFAULT_DECODE):
    """Run the prompts (``[B, L]``, or a ragged list: see :func:`prompt_batch`) through
    ``model`` in one jitted call, building every layer's decode cache as ``options`` say (and
    in chunks of ``options.prefill_chunk`` positions, so memory is bounded by the chunk).

    Returns ``(logits of the last position [B, V], the model's cache)``. Raises ValueError if a
    layer cannot run a prompt this long (an STU layer past its ``max_len``).
    """
    prompt, pad = prompt_batch(prompt_tokens)
    if getattr(model.config, "vocab_size", None) is None:
        raise ValueError("generate needs a token model (config.vocab_size set)")
    if not isinstance(options, DecodeOptions):
        raise ValueError(f"options must be a DecodeOptions, got {type(options).__name__}")
    model.check_length(prompt.shape[1], f"prompt length {prompt.shape[1]}")
    graphdef, state = nnx.split(model)
    return _prefill(graphdef, state, prompt, pad, options)


def decode_chunks(
    model: nnx.Module,
    cache: Any,
    last_logits: jax.Array,
    num_tokens: int,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    *,
    chunk: int | None = None,
) -> Iterator[jax.Array]:
    """Sample ``num_tokens`` tokens, feeding each back, and yield them ``chunk`` at a time
    (``[B, <= chunk]`` int32; default: all at once). Each chunk is one jitted ``lax.scan``.

    ``cache`` and ``last_logits [B, V]`` come from :func:`prefill`; the cache's strategy is the
    one chosen there. Raises ValueError, before decoding anything, if a layer cannot run
    ``cache.pos + num_tokens`` positions (an STU layer past its ``max_len``); distilled and
    attention layers have no limit.
    """
    _check_num_tokens(num_tokens)
    start = int(cache.pos)
    model.check_length(start + num_tokens, f"position {start} + {num_tokens} new tokens")
    chunk = num_tokens if chunk is None else chunk
    _check_num_tokens(chunk)
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if key is None:
        if not sampling.greedy:
            raise ValueError(f"{sampling} draws random tokens: pass a PRNG key")
        key = jax.random.key(0)  # split but never used by greedy decoding
    graphdef, state = nnx.split(model)
    done, logits = 0, last_logits
    while done < num_tokens:
        size = min(chunk, num_tokens - done)
        tokens, cache = _decode(
            graphdef, state, cache, logits, jax.random.fold_in(key, done), size, sampling
        )
        yield tokens
        done += size
        if done < num_tokens:
            cache, logits = _feed(graphdef, state, cache, tokens[:, -1])


def decode(
    model: nnx.Module,
    cache: Any,
    last_logits: jax.Array,
    num_tokens: int,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
) -> jax.Array:
    """All of :func:`decode_chunks` in one jitted ``lax.scan``: ``[B, num_tokens]`` int32."""
    return next(decode_chunks(model, cache, last_logits, num_tokens, sampling, key))


def generate(
    model: nnx.Module,
    prompt_tokens: Any,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    *,
    options: DecodeOptions = DEFAULT_DECODE,
) -> jax.Array:
    """Continue each prompt by ``max_new_tokens`` tokens: ``[B, max_new_tokens]`` int32.

    ``prompt_tokens``: int ``[B, L]`` or a list of token lists of different lengths (left-padded
    and masked: each row gets the tokens it would get alone). ``L + max_new_tokens`` may exceed
    ``model.config.max_len`` when no layer has a length limit (distilled or attention-only
    models); otherwise it raises ValueError naming the limiting layer. ``key`` is required
    unless sampling is greedy; the same key gives the same tokens. ``options`` choose how STU
    layers decode (see :func:`prefill`).
    """
    prompt, _ = prompt_batch(prompt_tokens)
    _check_num_tokens(max_new_tokens)
    model.check_length(
        prompt.shape[1] + max_new_tokens,
        f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens}",
    )
    logits, cache = prefill(model, prompt_tokens, options)
    return decode(model, cache, logits, max_new_tokens, sampling, key)
