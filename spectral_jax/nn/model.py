"""SpectralModel: a stack of pre-norm residual blocks whose mixers are STU layers,
sliding-window attention layers, or both alternating (hybrid, as in Flash STU).

Input: tokens ``[B, L]`` (an embedding table) or real vectors ``[B, L, d_input]`` (a linear
input projection). Output: logits ``[B, L, V]`` (an LM head, optionally tied to the
embedding) or regression outputs ``[B, L, d_output]``. Outputs are float32 whatever the
activation dtype; parameters are always float32.

Decoding delegates to each block: ``init_cache`` / ``prefill`` / ``step`` build and thread a
:class:`ModelCache` with one cache per layer and the position. Length limits belong to the
layers: ``length_limit`` is the smallest of the blocks' (STU: its ``max_len``; distilled LDS and
sliding-window attention: none), so a distilled or attention-only model runs past
``config.max_len``, the length it was trained at.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spectral_jax.nn.attention import AttentionConfig, Positions, SlidingWindowAttention
from spectral_jax.nn.blocks import BlockConfig, MLPActivation, ResidualBlock, RMSNorm
from spectral_jax.nn.horizon import parse_horizon, wrap
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU, FilterSource, STUConfig, make_filters
from spectral_jax.validation import (
    REMATS,
    Projection,
    Remat,
    Variant,
    float_dtype,
    one_of,
    positive_int,
)

LAYER_KINDS = {"S": "STU", "A": "sliding-window attention"}
PrefillOutputs = Literal["all", "last"]
PREFILL_OUTPUTS: tuple[PrefillOutputs, ...] = ("all", "last")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a SpectralModel's architecture.

    Input: exactly one of ``vocab_size`` (token ids ``[B, L]``) or ``d_input`` (vectors
    ``[B, L, d_input]``). Output width: ``d_output`` if set, else ``vocab_size``; a model with
    ``d_input`` must set ``d_output``. ``tie_embeddings`` reuses the embedding table as the LM
    head (needs ``vocab_size`` and no ``d_output``).

    Layers: ``layer_pattern`` is cycled over ``num_layers``, ``"S"`` = STU, ``"A"`` =
    sliding-window attention; ``"S"`` is STU-only, ``"SA"`` alternates (Flash STU), ``"SSA"``
    puts attention every third layer. ``attention_only=True`` ignores the pattern and makes every
    mixer an attention layer: a Transformer of the same depth and widths, same blocks.

    ``d_hidden``: the MLP's width (default: 8/3 * d_model rounded up to a multiple of 8);
    ``mlp_activation``: its gate, ``"swiglu"`` or ``"geglu"`` (tanh GELU, Flash STU's).
    ``bias``: biases in every linear layer (MLPs, attention projections, the LM head; a tied
    head gets its own bias vector ``[V]``). ``norm_eps``: every RMSNorm's epsilon.
    ``dtype``: activation dtype name, "float32" or "bfloat16" ("float64" is for equivalence
    tests under ``jax.enable_x64``). ``remat``: per-block rematerialization in training
    (:func:`block_runner`). STU fields (``num_filters``, ``stu_variant``,
    ``stu_projection``, ``stu_shared_mixture``, ``stu_filters``, ``k_u``, ``k_y``) and attention
    fields (``num_heads``, ``window``, ``rope_base``, ``attention_positions``,
    ``attention_softcap``) are validated by the layer configs they build. ``horizon``: the
    memory horizon of every STU (and, once distilled, LDS) mixer past ``max_len``
    (:mod:`spectral_jax.nn.horizon`: ``"none"``, ``"restart:R"``, or ``"cutoff"`` for distilled
    layers only); with a restart policy, STU models have no length limit.
    """

    d_model: int
    num_layers: int
    max_len: int
    vocab_size: int | None = None
    d_input: int | None = None
    d_output: int | None = None
    tie_embeddings: bool = False
    layer_pattern: str = "S"
    attention_only: bool = False
    d_hidden: int | None = None
    num_filters: int = 24
    stu_variant: Variant = "standard"
    stu_projection: Projection = "full"
    k_u: int = 0
    k_y: int = 0
    num_heads: int = 4
    window: int = 128
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    remat: Remat = "none"
    stu_shared_mixture: bool = False
    stu_filters: FilterSource = "computed"
    attention_positions: Positions = "rope"
    attention_softcap: float | None = None
    mlp_activation: MLPActivation = "swiglu"
    bias: bool = False
    horizon: str = "none"

    def __post_init__(self) -> None:
        for field in ("d_model", "num_layers", "max_len"):
            positive_int("ModelConfig", field, getattr(self, field))
        for field in ("vocab_size", "d_input", "d_output", "d_hidden"):
            if getattr(self, field) is not None:
                positive_int("ModelConfig", field, getattr(self, field))
        if (self.vocab_size is None) == (self.d_input is None):
            raise ValueError(
                f"exactly one of vocab_size={self.vocab_size!r} (token input) and "
                f"d_input={self.d_input!r} (vector input) must be set"
            )
        if self.d_input is not None and self.d_output is None:
            raise ValueError(f"d_input={self.d_input} needs d_output (the regression width)")
        if self.tie_embeddings and (self.vocab_size is None or self.d_output is not None):
            raise ValueError(
                f"tie_embeddings=True needs vocab_size (got {self.vocab_size!r}) and no "
                f"d_output (got {self.d_output!r})"
            )
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            raise ValueError(
                f"layer_pattern={self.layer_pattern!r} must be a non-empty string of "
                f"{sorted(LAYER_KINDS)} ({LAYER_KINDS})"
            )
        object.__setattr__(self, "dtype", float_dtype("ModelConfig", "dtype", self.dtype).name)
        one_of("ModelConfig", "remat", self.remat, REMATS)
        self.block_config()
        horizon = parse_horizon(self.horizon)
        if "S" in self.layer_kinds:
            self.stu_config()
            horizon.check_window(self.max_len, f"ModelConfig (max_len={self.max_len})")
        if "A" in self.layer_kinds:
            self.attention_config()

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """One letter per layer: "S" (STU) or "A" (attention)."""
        if self.attention_only:
            return ("A",) * self.num_layers
        pattern = self.layer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    @property
    def hidden_dim(self) -> int:
        if self.d_hidden is not None:
            return self.d_hidden
        return 8 * math.ceil(self.d_model * 8 / 3 / 8)

    @property
    def out_dim(self) -> int:
        return self.d_output if self.d_output is not None else self.vocab_size

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.d_model, self.hidden_dim, self.norm_eps, self.mlp_activation, self.bias
        )

    def stu_config(self) -> STUConfig:
        return STUConfig(
            d_in=self.d_model,
            d_out=self.d_model,
            max_len=self.max_len,
            num_filters=self.num_filters,
            variant=self.stu_variant,
            projection=self.stu_projection,
            shared_mixture=self.stu_shared_mixture,
            filters=self.stu_filters,
            k_u=self.k_u,
            k_y=self.k_y,
            dtype=self.activation_dtype,
        )

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            window=self.window,
            rope_base=self.rope_base,
            dtype=self.activation_dtype,
            positions=self.attention_positions,
            softcap=self.attention_softcap,
            bias=self.bias,
        )


def block_runner(remat: Remat):
    """``run(block, h) -> block(h)``, rematerialized as ``remat`` says.

    ``"none"`` keeps every activation for the backward pass; ``"full"`` keeps only each block's
    input and recomputes the rest (``jax.checkpoint`` with no policy); ``"save_dots"`` also keeps
    the outputs of the weight matmuls, those without batch dimensions
    (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), and recomputes attention
    scores, FFTs, norms and elementwise work. (``checkpoint_dots``, which would also keep
    batched products, fails on the STU's complex frequency-domain product in jax 0.10.)
    Values and gradients are the same in all three.
    """
    one_of("block_runner", "remat", remat, REMATS)
    run = lambda block, h: block(h)  # noqa: E731
    if remat == "none":
        return run
    policy = (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "save_dots" else None
    )
    return nnx.remat(run, policy=policy)


@struct.dataclass
class ModelCache:
    """Decode state of a :class:`SpectralModel`.

    layers: one cache per block, in order. pos: int32 scalar, the number of positions consumed
    (left padding included): the next token's position.
    """

    layers: tuple[Any, ...]
    pos: jax.Array


class SpectralModel(nnx.Module):
    """STU-only, hybrid STU/attention, or attention-only sequence model.

    ``model(x)``: tokens [B, L] int or vectors [B, L, d_input] -> [B, L, out_dim] float32.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        act = config.activation_dtype
        d = config.d_model
        if config.vocab_size is not None:
            self.embed = nnx.Embed(
                config.vocab_size, d, dtype=act, rngs=rngs,
                embedding_metadata={"logical_axes": ("vocab", "embed")},
            )  # fmt: skip
        else:
            self.embed = nnx.Linear(
                config.d_input, d, dtype=act, rngs=rngs,
                kernel_metadata={"logical_axes": ("input", "embed")},
                bias_metadata={"logical_axes": ("embed",)},
            )  # fmt: skip
        block_config = config.block_config()
        # one copy of the fixed spectral filters, shared by every STU layer
        filters = make_filters(config.stu_config()) if "S" in config.layer_kinds else None
        blocks = []
        for kind in config.layer_kinds:
            if kind == "S":
                mixer = STU(config.stu_config(), rngs=rngs, filters=filters)
                mixer = wrap(mixer, config.horizon)
            else:
                mixer = SlidingWindowAttention(config.attention_config(), rngs=rngs)
            blocks.append(ResidualBlock(mixer, block_config, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(d, eps=config.norm_eps)
        self.out_dtype = jnp.promote_types(act, jnp.float32)
        if config.tie_embeddings:
            self.head = None
            if config.bias:
                self.head_bias = nnx.Param(
                    jnp.zeros((config.out_dim,), jnp.float32), logical_axes=("vocab",)
                )
        else:
            self.head = nnx.Linear(
                d,
                config.out_dim,
                use_bias=config.bias or config.d_output is not None,  # regression: a bias
                dtype=act,
                preferred_element_type=self.out_dtype,
                rngs=rngs,
                kernel_metadata={"logical_axes": ("embed", "vocab")},
                bias_metadata={"logical_axes": ("vocab",)},
            )

    def num_params(self) -> int:
        """Number of trainable parameters (entries of all nnx.Param leaves)."""
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def _embed(self, x: jax.Array, time_axis: bool) -> jax.Array:
        """Tokens [B(, L)] or vectors [B(, L), d_input] -> [B(, L), D] activations."""
        c = self.config
        where = "SpectralModel" if time_axis else "SpectralModel.step"
        seq = "[B, L]" if time_axis else "[B]"
        if c.vocab_size is not None:
            if x.ndim != 1 + time_axis or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{where}: tokens must be int {seq}, got {x.dtype} {x.shape}")
        elif x.ndim != 2 + time_axis or x.shape[-1] != c.d_input:
            raise ValueError(
                f"{where}: inputs must be {seq[:-1]}, {c.d_input}], got shape {x.shape}"
            )
        if time_axis:
            if x.shape[1] < 1:
                raise ValueError(f"{where}: length must be >= 1, got shape {x.shape}")
            self.check_length(x.shape[1], f"{where}: length {x.shape[1]}")
        return self.embed(x).astype(c.activation_dtype)

    def _head(self, h: jax.Array) -> jax.Array:
        """Activations [..., D] -> outputs [..., out_dim] in float32 (float64 if x64)."""
        h = self.final_norm(h)
        if self.head is None:
            table = self.embed.embedding[...].astype(h.dtype)
            logits = jnp.einsum("...d,vd->...v", h, table, preferred_element_type=self.out_dtype)
            if self.config.bias:
                logits = logits + self.head_bias[...].astype(self.out_dtype)
            return logits
        return self.head(h).astype(self.out_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: tokens [B, L] or vectors [B, L, d_input] -> [B, L, out_dim]."""
        h = self._embed(x, time_axis=True)
        run = block_runner(self.config.remat)
        for block in self.blocks:
            h = run(block, h)
        return self._head(h)

    @property
    def length_limit(self) -> int | None:
        """The longest sequence (prompt plus generated tokens) every block can run, or None if
        no block has a limit (distilled LDS and sliding-window attention layers only)."""
        limits = [b.length_limit for b in self.blocks if b.length_limit is not None]
        return min(limits) if limits else None

    def check_length(self, length: int, what: str) -> None:
        """Raise ValueError naming the first block that cannot run ``length`` positions;
        ``what`` says what needs them (e.g. ``"prompt length 12 + max_new_tokens 2000"``)."""
        for index, block in enumerate(self.blocks):
            limit = block.length_limit
            if limit is not None and length > limit:
                kind = type(block.mixer).__name__
                raise ValueError(
                    f"{what} needs {length} positions, but block {index} ({kind}) can run at most "
                    f"max_len={limit}; distill the model (spectral-jax distill, or "
                    "spectral_jax.nn.distillation.distill_model) to replace its STU layers by LDS "
                    "recurrences, which decode without a length limit"
                )

    def init_cache(
        self,
        batch: int,
        max_len: int | None = None,
        dtype: Any = None,
        options: DecodeOptions = DEFAULT_DECODE,
    ) -> ModelCache:
        """Empty caches for sequences of at most ``max_len`` tokens (default: config.max_len;
        layers without a limit keep constant-size caches whatever it is), K/V and conv
        histories in ``dtype`` (default: the activation dtype); ``options`` choose how STU
        layers decode."""
        max_len = self.config.max_len if max_len is None else max_len
        dtype = self.config.activation_dtype if dtype is None else dtype
        layers = tuple(block.init_cache(batch, max_len, dtype, options) for block in self.blocks)
        return ModelCache(layers=layers, pos=jnp.zeros((), jnp.int32))

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        *,
        outputs: PrefillOutputs = "all",
        cache: ModelCache | None = None,
    ) -> tuple[jax.Array, ModelCache]:
        """Run a prompt: x as in ``__call__`` (length L) -> (outputs, caches at position L).

        cache: None (the prompt starts at position 0), or the ``ModelCache`` of the positions
        before (from ``prefill``, ``step`` or ``init_cache``): every layer continues from it and
        the returned caches are at position ``cache.pos + L``; ``pad`` then counts from
        ``cache.pos``.

        outputs: ``"all"``: ``[B, L, out_dim]``; ``"last"``: ``[B, out_dim]``, position L - 1
        only (the head forms nothing else: generation needs only these).
        options: how STU layers decode from here, and ``prefill_chunk``: a prompt longer than
        that runs chunk by chunk, each layer continuing from the cache the previous chunk left
        (a ``lax.scan`` over the whole chunks, one compiled body, then the rest), so the
        activations held are ``[B, chunk, d_model]`` whatever L; shorter prompts, or
        ``prefill_chunk=None``, run in one pass. pad: [B] int, left-pad positions of each row of
        a ragged batch (outputs there are meaningless), or None."""
        one_of("SpectralModel.prefill", "outputs", outputs, PREFILL_OUTPUTS)
        if not isinstance(options, DecodeOptions):
            raise ValueError(f"options must be a DecodeOptions, got {type(options).__name__}")
        if x.ndim < 2:
            self._embed(x, time_axis=True)  # raises: the message names the expected shape
        batch, length, chunk = x.shape[0], x.shape[1], options.prefill_chunk
        first = None if cache is None else cache.layers
        offset = jnp.zeros((), jnp.int32) if cache is None else cache.pos

        def run(caches, x_chunk, start):
            """One chunk [B, T(, d_input)] at positions start .. start + T - 1 -> (caches,
            hidden states [B, T, D] for "all", [B, 1, D] for "last")."""
            h = self._embed(x_chunk, time_axis=True)
            chunk_pad = None if pad is None else pad - start
            caches = caches or (None,) * len(self.blocks)
            new = []
            for block, cache in zip(self.blocks, caches, strict=True):
                h, cache = block.prefill(h, options, chunk_pad, cache)
                new.append(cache)
            return tuple(new), (h if outputs == "all" else h[:, -1:])

        if chunk is None or length <= chunk:
            caches, h = run(first, x, 0)
        else:
            self.check_length(length, f"SpectralModel: length {length}")
            caches = first or self.init_cache(batch, None, None, options).layers
            count, hidden = length // chunk, []
            chunks = x[:, : count * chunk].reshape(batch, count, chunk, *x.shape[2:])

            def body(caches, xs):
                x_chunk, start = xs
                return run(caches, x_chunk, start)

            starts = jnp.arange(count, dtype=jnp.int32) * chunk
            caches, hs = jax.lax.scan(body, caches, (chunks.swapaxes(0, 1), starts))
            hidden.append(hs.swapaxes(0, 1).reshape(batch, -1, hs.shape[-1]))  # [B, n*T', D]
            if count * chunk < length:
                caches, h = run(caches, x[:, count * chunk :], jnp.int32(count * chunk))
                hidden.append(h)
            h = hidden[-1] if outputs == "last" else jnp.concatenate(hidden, axis=1)
        y = self._head(h)
        y = y if outputs == "all" else y[:, -1]
        return y, ModelCache(caches, offset + length)

    def step(self, cache: ModelCache, x_t: jax.Array) -> tuple[ModelCache, jax.Array]:
        """One position: x_t tokens [B] or vectors [B, d_input] -> (caches, y_t [B, out_dim])."""
        if not isinstance(cache, ModelCache) or len(cache.layers) != len(self.blocks):
            raise ValueError(
                f"step: cache must be a ModelCache of {len(self.blocks)} layer caches "
                f"(from init_cache or prefill), got {type(cache).__name__}"
            )
        h = self._embed(x_t, time_axis=False)
        new_caches = []
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            layer_cache, h = block.step(layer_cache, h)
            new_caches.append(layer_cache)
        return ModelCache(tuple(new_caches), cache.pos + 1), self._head(h)
