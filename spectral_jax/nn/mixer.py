"""What every sequence layer is: the :class:`SequenceMixer` protocol, and the
:class:`DecodeOptions` that the caller of ``init_cache`` / ``prefill`` chooses.

Every mixer (STU, distilled LDS, sliding-window attention) has the same entry points:

* ``__call__(x [B, L, D]) -> y [B, L, D]``: the parallel (training) path;
* ``init_cache(batch, max_len, dtype, options) -> cache``: an empty decode state;
* ``prefill(x [B, T, D], options, pad, cache=None) -> (y [B, T, D], cache)``: the parallel path
  that also returns the decode state after its last position. Without ``cache`` the positions
  are ``0 .. T - 1``; with one (from ``init_cache``, a previous ``prefill`` or ``step``) they
  are ``pos .. pos + T - 1`` and the layer continues from it (attention: the ring buffer is the
  window's prefix; LDS: from its state; STU: from its convolution's history), so a long prompt
  runs in chunks of bounded memory with the same outputs and final cache as in one pass.
  ``pad: [B]`` int (or None) counts the left-pad positions of each row of a ragged batch from
  the call's first position ``pos`` (row ``b``'s positions ``< pos + pad[b]`` are padding;
  negative or past ``T`` in a later chunk); the block has zeroed ``x`` there, which is all a
  causal time-invariant layer (STU, LDS) needs, so those ignore it; attention masks the pad
  keys and starts each row's rotary positions at its first real token;
* ``step(cache, x_t [B, D]) -> (cache, y_t [B, D])``: one position.

``prefill`` returns ``(y, cache)`` because it is a forward pass that also yields a state, like
``__call__``; ``step`` returns ``(cache, y_t)`` because it is the body of ``lax.scan``, whose
carry comes first. Caches are explicit pytrees; step and prefill reproduce ``__call__``.

Decode choices (which cache a convolution keeps, its block length) are made once, where the
cache is built, from the :class:`DecodeOptions` that ``generate`` passes down; layers never
change their configs to decode differently. A layer ignores the options that do not concern
it (attention has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from spectral_jax.validation import DECODE_STRATEGIES, DecodeStrategy, one_of, positive_int

DEFAULT_PREFILL_CHUNK = 8192
"""Default positions per prefill chunk (see :class:`DecodeOptions`), by measurement on CPU:
TODO."""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Choices made where a decode cache is built.

    strategy: how STU layers decode (``"futurefill"`` or ``"naive"``, see
      :mod:`spectral_jax.ops.conv_decode`); distilled LDS layers always step their recurrence.
    block_len: naive read block / FutureFill epoch length, None for the default
      (:func:`spectral_jax.ops.conv_decode.default_block_len`).
    prefill_chunk: positions per chunk of a model's prefill
      (:meth:`spectral_jax.nn.model.SpectralModel.prefill`): a longer prompt runs chunk by
      chunk, every layer continuing from its cache, so its memory is that of one chunk; None
      runs any prompt in one pass. The default, :data:`DEFAULT_PREFILL_CHUNK`, leaves shorter
      prompts in one pass.
    """

    strategy: DecodeStrategy = "futurefill"
    block_len: int | None = None
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK

    def __post_init__(self) -> None:
        one_of("DecodeOptions", "strategy", self.strategy, DECODE_STRATEGIES)
        for field in ("block_len", "prefill_chunk"):
            if getattr(self, field) is not None:
                positive_int("DecodeOptions", field, getattr(self, field))


DEFAULT_DECODE = DecodeOptions()


class SequenceMixer(Protocol):
    """What a block needs from a sequence layer. x: [B, L, D] -> [B, L, D].

    ``length_limit``: the longest sequence (prompt plus generated tokens) the layer can run,
    or None if it has no limit (an LDS recurrence, sliding-window attention).
    """

    @property
    def length_limit(self) -> int | None: ...

    def __call__(self, x: jax.Array) -> jax.Array: ...

    def init_cache(
        self, batch: int, max_len: int, dtype: Any, options: DecodeOptions = DEFAULT_DECODE
    ) -> Any: ...

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, Any]: ...

    def step(self, cache: Any, x_t: jax.Array) -> tuple[Any, jax.Array]: ...
