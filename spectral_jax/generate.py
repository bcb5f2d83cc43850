"""Autoregressive generation from a token model: a jitted prefill, then a jitted decode loop.

The decode loop runs entirely inside ``lax.scan`` (one compiled program for all new tokens; no
Python work per token). Each layer keeps its own explicit cache; STU layers decode with the
``naive`` or ``futurefill`` strategy (:mod:`spectral_jax.ops.conv_decode`), chosen per call through
``nnx.view`` (parameters are shared, not copied); a distilled model's LDS layers decode in
``O(1)`` per token whatever the strategy.

The model is any module with ``config.vocab_size`` / ``config.max_len``, ``prefill(tokens
[B, L]) -> (logits [B, L, V], caches)`` and ``step(caches, tokens [B]) -> (caches, logits
[B, V])``, e.g. :class:`spectral_jax.nn.model.SpectralModel`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.validation import DECODE_STRATEGIES as STRATEGIES


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
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t < float("inf"):
            raise ValueError(f"Sampling.temperature must be a finite float >= 0, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"Sampling.top_k must be an integer >= 0, got {k!r}")
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


def _prompt_array(prompt_tokens: Any) -> jax.Array:
    """Equal-length prompts ``[B, L]`` as int32; ragged lists raise."""
    if isinstance(prompt_tokens, list | tuple) and prompt_tokens:
        lengths = {len(p) if hasattr(p, "__len__") else None for p in prompt_tokens}
        if len(lengths) > 1:
            raise ValueError(
                f"prompts must all have the same length (got lengths {sorted(lengths, key=str)}); "
                "batch prompts of equal length, or generate them one at a time"
            )
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be int [B, L], got {prompt.dtype} {prompt.shape}")
    return prompt.astype(jnp.int32)


def _check_num_tokens(num_tokens: Any) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"number of new tokens must be an integer >= 1, got {num_tokens!r}")


@functools.partial(jax.jit, static_argnames="graphdef")
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array):
    logits, cache = nnx.merge(graphdef, state).prefill(prompt)
    return logits[:, -1], cache


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


def prefill(model: nnx.Module, prompt_tokens: Any, *, strategy: str | None = None):
    """Run the prompts ``[B, L]`` through ``model`` in one jitted call.

    Returns ``(logits of the last position [B, V], per-layer caches)``. ``strategy`` (``"naive"``
    or ``"futurefill"``) overrides the STU layers' configured decode strategy.
    """
    prompt = _prompt_array(prompt_tokens)
    cfg = model.config
    if getattr(cfg, "vocab_size", None) is None:
        raise ValueError("generate needs a token model (config.vocab_size set)")
    if not 1 <= prompt.shape[1] <= cfg.max_len:
        raise ValueError(f"prompt length {prompt.shape[1]} must be in [1, max_len={cfg.max_len}]")
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
        model = nnx.view(model, decode_strategy=strategy, raise_if_not_found=False)
    graphdef, state = nnx.split(model)
    return _prefill(graphdef, state, prompt)


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
    one chosen there. Stepping past the caches' ``max_len`` raises at run time.
    """
    _check_num_tokens(num_tokens)
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
    strategy: str | None = None,
) -> jax.Array:
    """Continue each of the equal-length prompts ``[B, L]`` by ``max_new_tokens`` tokens.

    Returns the new tokens ``[B, max_new_tokens]`` int32. ``L + max_new_tokens`` must not
    exceed ``model.config.max_len``. ``key`` is required unless sampling is greedy; the same
    key gives the same tokens. ``strategy`` selects the STU decode cache (see :func:`prefill`).
    """
    prompt = _prompt_array(prompt_tokens)
    _check_num_tokens(max_new_tokens)
    max_len = model.config.max_len
    if prompt.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_len={max_len}"
        )
    logits, cache = prefill(model, prompt, strategy=strategy)
    return decode(model, cache, logits, max_new_tokens, sampling, key)
