"""recurrentgemma's Griffin as a decode peer: the only module that imports ``recurrentgemma``.

Google DeepMind's JAX Griffin (``recurrentgemma==1.0.1``, Flax linen), built with its own code
and decoded as its sampler does: the module applied to one token with its cache, inside one
compiled ``lax.scan`` (greedy). It is not a dependency of the package: ``make bench-peers``
installs it, and :func:`missing` says why it cannot be used when it is absent.

Shapes: prompts ``[B, L]`` int32, last logits ``[B, V]`` float32, the cache a dict of one
``RecurrentBlockCache`` (RG-LRU state ``[B, E]``, conv state ``[B, 3, E]``) or
``AttentionBlockCache`` (keys and values ``[B, W, 1, Dh]``, ``num_tokens [B]``) per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

PREFILL_ROWS = 16  # prompt rows per prefill call: its attention scores are [rows, H, L, L]


def missing() -> str | None:
    """Why Griffin cannot run here (recurrentgemma or a module it imports is absent), or None."""
    try:
        import recurrentgemma.jax  # noqa: F401
    except ImportError as err:
        return f"recurrentgemma is not installed ({err}); `make bench-peers` installs it"
    return None


@dataclasses.dataclass(frozen=True)
class GriffinShape:
    """Griffin's sizes: ``pattern`` one letter per block, ``R`` (RG-LRU recurrent block) or
    ``A`` (local multi-query attention over ``window`` keys); width ``d_model`` (also the
    RG-LRU width), gated-MLP width ``mlp_width``, ``num_heads`` heads (attention and the
    RG-LRU's block-diagonal gates), ``vocab`` tokens (tied embedding)."""

    pattern: str
    d_model: int
    mlp_width: int
    num_heads: int
    vocab: int
    window: int

    def __post_init__(self) -> None:
        if not self.pattern or set(self.pattern) - {"R", "A"}:
            raise ValueError(
                f"GriffinShape.pattern={self.pattern!r} must be a non-empty string of R "
                "(recurrent block) and A (attention block)"
            )

    def flops_per_token(self) -> float:
        """Decode FLOPs per token (a multiply-add is 2; norms, gates' nonlinearities, rotary
        embeddings and softmax not counted): head ``2DV``; per block the gated MLP ``6DF``;
        recurrent block ``6DE`` (linear_x, linear_y, linear_out) ``+ 8E`` (width-4 temporal
        conv) ``+ 4E^2/H`` (the RG-LRU's two block-diagonal gates) ``+ 2E`` (``h = a h + x``);
        attention block ``4D^2 + 4D Dh`` (queries and output; one key and one value head of
        width ``Dh = D/H``) ``+ 4D(W + 1)`` (scores and values over the cached window and the
        new key, which its step computes whatever the mask)."""
        D, F, V, H, W = self.d_model, self.mlp_width, self.vocab, self.num_heads, self.window
        E, head_dim = D, D // H
        recurrent = 6 * D * E + 8 * E + 4 * E * E / H + 2 * E
        attention = 4 * D * D + 4 * D * head_dim + 4 * D * (W + 1)
        blocks = sum(recurrent if kind == "R" else attention for kind in self.pattern)
        return float(2 * D * V + len(self.pattern) * 6 * D * F + blocks)


class GriffinPeer:
    """A randomly initialised Griffin of ``shape``, float32; ``prefill`` and ``decode`` have the
    signatures :func:`decode_bench_common.time_decode` takes."""

    def __init__(self, shape: GriffinShape, seed: int = 0):
        import recurrentgemma.jax as rg

        kinds = {"R": rg.TemporalBlockType.RECURRENT, "A": rg.TemporalBlockType.ATTENTION}
        self.shape = shape
        self.config = rg.GriffinConfig(
            vocab_size=shape.vocab,
            width=shape.d_model,
            mlp_expanded_width=shape.mlp_width,
            num_heads=shape.num_heads,
            block_types=tuple(kinds[k] for k in shape.pattern),
            embeddings_scale_by_sqrt_dim=False,
            attention_window_size=shape.window,
            logits_soft_cap=0.0,
            lru_width=shape.d_model,
            scan_type=rg.ScanType.LINEAR_NATIVE,
        )
        self.model = rg.Griffin(self.config, gradient_checkpointing=False)
        tokens = jnp.zeros((1, 4), jnp.int32)
        self.params = self.model.init(jax.random.key(seed), tokens, positions(tokens))["params"]

    def _apply(self, params, tokens, segment_pos, cache):
        return self.model.apply(
            {"params": params}, tokens, segment_pos, cache, return_logits=True, return_cache=True
        )

    @functools.cached_property
    def _prefill_rows(self):
        def run(params, tokens):
            logits, cache = self._apply(params, tokens, positions(tokens), None)
            return logits[:, -1], cache

        return jax.jit(run)

    def prefill(self, prompt: jax.Array) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        """The whole prompt ``[B, L]`` in one forward pass per ``PREFILL_ROWS`` rows (the rows
        are independent; this bounds the ``[rows, H, L, L]`` attention scores), the caches
        joined along the batch: ``(last logits [B, V], (cache, next position))``; the position
        (an int32 scalar, as in our ``ModelCache``) is what the decode steps continue from."""
        parts = [
            self._prefill_rows(self.params, prompt[i : i + PREFILL_ROWS])
            for i in range(0, prompt.shape[0], PREFILL_ROWS)
        ]
        logits, cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
        return logits, (cache, jnp.int32(prompt.shape[1]))

    @functools.cached_property
    def _decode(self):
        def run(params, cache, logits, num_tokens: int):
            cache, start = cache
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

            def advance(carry, pos):
                cache, token = carry
                segment_pos = jnp.full((token.shape[0], 1), pos, jnp.int32)
                logits, cache = self._apply(params, token[:, None], segment_pos, cache)
                token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
                return (cache, token), token

            steps = start + jnp.arange(num_tokens - 1, dtype=jnp.int32)
            _, rest = jax.lax.scan(advance, (cache, first), steps)
            return jnp.concatenate([first[:, None], rest.T], axis=1)

        return jax.jit(run, static_argnames="num_tokens")

    def decode(self, cache: tuple[Any, jax.Array], logits: jax.Array, num_tokens: int):
        """``num_tokens`` greedy tokens ``[B, num_tokens]`` after :meth:`prefill`: the first
        from ``logits``, then the module on each token with its cache, one ``lax.scan``."""
        return self._decode(self.params, cache, logits, num_tokens)


def positions(tokens: jax.Array) -> jax.Array:
    """Segment positions ``[B, L]`` of unpadded prompts: ``0 .. L-1`` in every row."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
