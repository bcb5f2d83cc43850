"""The Spectral Transform Unit as an nnx module: a thin shell over :mod:`~.ops.stu_ops`."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.ops import conv_decode, stu_ops
from spectral_jax.ops.filters import max_num_filters, spectral_filters
from spectral_jax.ops.projection import PROJECTIONS_BY_NAME, STUProjection
from spectral_jax.validation import (
    PROJECTIONS,
    STATE_DTYPES,
    VARIANTS,
    Projection,
    Variant,
    float_dtype,
    one_of,
    positive_int,
)

FilterSource = Literal["computed", "loaded"]
"""Where an STU's fixed filters come from: :func:`~spectral_jax.ops.filters.spectral_filters`, or
a checkpoint's own array (e.g. a Flash STU ``phi`` kept bit for bit), restored with the state."""
FILTER_SOURCES: tuple[str, ...] = get_args(FilterSource)


@dataclasses.dataclass(frozen=True)
class STUConfig:
    """Configuration of one STU layer.

    Attributes:
      d_in, d_out: input and output features.
      max_len: longest input; filters are computed for this length and inputs of length
        ``L <= max_len`` use their first ``L`` taps. It is the layer's ``length_limit``: decoding
        stops there too (distill the layer into an LDS to run without a limit).
      num_filters: ``K``, the number of spectral filters per branch.
      variant: ``"standard"`` (plus and alternating-sign branches) or ``"hankel_l"`` (one branch).
      projection: ``"full"`` (``M: [2K, d_in, d_out]``) or ``"tensordot"`` (project inputs, then one
        learned filter mixture per output channel).
      shared_mixture: tensordot mode only, standard variant: one learned filter mixture
        ``M_filt_plus`` serves both branches (Flash STU's approx mode, whose ``M_filters`` feeds
        the plus and the alternating-sign convolution alike); ``params()`` reports it under both
        names, so every consumer of the parameters (decode caches, distillation) sees the usual
        two-branch layer.
      filters: ``"computed"`` (the spectral filters of ``max_len``, ``num_filters``,
        ``variant``) or ``"loaded"``: the layer starts with zero filters that a checkpoint's
        state (or an importer) fills; they are saved and restored with the model's state.
      k_u, k_y: number of autoregressive input / output lags (0 disables them).
      dtype: activation dtype; FFTs always run in at least float32.
      param_dtype: parameter (and filter) dtype: float32, or float64 for references under x64.

    How the layer decodes (naive or FutureFill cache, block length) is not part of the config:
    it is a :class:`~spectral_jax.nn.mixer.DecodeOptions` given to ``init_cache`` / ``prefill``.
    """

    d_in: int
    d_out: int
    max_len: int
    num_filters: int = 24
    variant: Variant = "standard"
    projection: Projection = "full"
    k_u: int = 0
    k_y: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    shared_mixture: bool = False
    filters: FilterSource = "computed"

    def __post_init__(self):
        for name in ("d_in", "d_out", "num_filters"):
            positive_int("STUConfig", name, getattr(self, name))
        positive_int("STUConfig", "max_len", self.max_len, minimum=2)
        positive_int("STUConfig", "k_u", self.k_u, minimum=0)
        positive_int("STUConfig", "k_y", self.k_y, minimum=0)
        one_of("STUConfig", "variant", self.variant, VARIANTS)
        one_of("STUConfig", "projection", self.projection, PROJECTIONS)
        one_of("STUConfig", "filters", self.filters, FILTER_SOURCES)
        if self.shared_mixture not in (False, True):
            raise ValueError(f"STUConfig.shared_mixture={self.shared_mixture!r} must be a bool")
        if self.shared_mixture and (self.projection, self.variant) != ("tensordot", "standard"):
            raise ValueError(
                "STUConfig.shared_mixture=True shares the two branches' filter mixture: it needs "
                f"projection='tensordot' and variant='standard', got {self.projection!r} and "
                f"{self.variant!r}"
            )
        limit = max_num_filters(self.max_len, self.variant)
        if self.num_filters > limit:
            raise ValueError(
                f"STUConfig.num_filters={self.num_filters} exceeds {limit}, the most filters "
                f"available at max_len={self.max_len} ({self.variant})"
            )
        float_dtype("STUConfig", "dtype", self.dtype)
        float_dtype("STUConfig", "param_dtype", self.param_dtype, STATE_DTYPES)

    @property
    def two_branch(self) -> bool:
        return self.variant == "standard"

    @property
    def projector(self) -> STUProjection:
        """The projection's object (:mod:`spectral_jax.ops.projection`), by ``projection``."""
        return PROJECTIONS_BY_NAME[self.projection]


@struct.dataclass
class STUCache:
    """Decode state of one STU layer.

    conv: the convolution's cache (:class:`~spectral_jax.ops.conv_decode.NaiveCache` or
      :class:`~spectral_jax.ops.conv_decode.FutureFillCache`); its ``pos`` is the layer's position.
    inputs: ``[B, max(k_u - 1, 0), d_in]`` previous inputs, most recent first.
    outputs: ``[B, k_y, d_out]`` previous outputs, most recent first.
    """

    conv: conv_decode.ConvCache
    inputs: jax.Array
    outputs: jax.Array


STU_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "M_in": ("embed", "embed"),
    "M_filt_plus": ("filters", "embed"),
    "M_filt_minus": ("filters", "embed"),
    "M_plus": ("filters", "embed", "embed"),
    "M_minus": ("filters", "embed", "embed"),
    "M_u": ("lag", "embed", "embed"),
    "M_y": ("lag", "embed", "embed"),
}
"""Logical axis names of the STU's learned parameters (mapped to mesh axes by
``spectral_jax.train.sharding``); the distilled LDS layer names the same parameters alike."""


class SpectralFilters(nnx.Variable):
    """Fixed spectral filters ``[max_len, K]``: module state that is never trained."""


def make_filters(config: STUConfig) -> SpectralFilters:
    """The filter variable ``[max_len, K]`` for ``config``; pass it to several layers to share
    one copy. ``config.filters == "loaded"``: zeros, for a checkpoint's filters to replace."""
    if config.filters == "loaded":
        phi = np.zeros((config.max_len, config.num_filters))
    else:
        phi, _ = spectral_filters(config.max_len, config.num_filters, config.variant)
    # never sharded along time: every position's convolution needs the whole filter
    return SpectralFilters(
        jnp.asarray(phi, dtype=config.param_dtype), logical_axes=("time", "filters")
    )


class STU(nnx.Module):
    """Spectral Transform Unit ``[B, L, d_in] -> [B, L, d_out]`` (math: :mod:`~.stu_ops`)."""

    def __init__(
        self, config: STUConfig, *, rngs: nnx.Rngs, filters: SpectralFilters | None = None
    ):
        self.config = config
        K, d_in, d_out, pdt = config.num_filters, config.d_in, config.d_out, config.param_dtype
        if filters is None:
            filters = make_filters(config)
        elif filters.shape != (config.max_len, K):
            raise ValueError(
                f"shared filters have shape {filters.shape}, expected {(config.max_len, K)}"
            )
        self.filters = filters

        def normal(shape, fan_in):
            return nnx.Param(jax.random.normal(rngs.params(), shape, pdt) / jnp.sqrt(fan_in))

        spectral = config.projector.stu_params(K, d_in, d_out, config.two_branch)
        if config.shared_mixture:
            del spectral["M_filt_minus"]  # params() reads M_filt_plus for both branches
        for name, (shape, fan_in) in spectral.items():
            setattr(self, name, normal(shape, fan_in))
        if config.k_u:
            self.M_u = normal((config.k_u, d_in, d_out), d_in * config.k_u)
        if config.k_y:
            # Zero init: the output recurrence starts as the identity map (stable).
            self.M_y = nnx.Param(jnp.zeros((config.k_y, d_out, d_out), pdt))
        for name, value in vars(self).items():
            if isinstance(value, nnx.Param):
                value.set_metadata(logical_axes=STU_PARAM_AXES[name])

    def params(self) -> dict[str, jax.Array]:
        """The learned parameter arrays by name (the keys :mod:`~.ops.stu_ops` expects); with
        ``shared_mixture``, ``M_filt_minus`` is ``M_filt_plus``."""
        params = {
            name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)
        }
        if self.config.shared_mixture:
            params["M_filt_minus"] = params["M_filt_plus"]
        return params

    def check_input(self, x: jax.Array) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, L, d_in]`` with ``1 <= L <= max_len``."""
        cfg = self.config
        if x.ndim != 3:
            raise ValueError(f"STU expects input [batch, length, {cfg.d_in}], got shape {x.shape}")
        if x.shape[-1] != cfg.d_in:
            raise ValueError(f"STU expects {cfg.d_in} input features, got {x.shape[-1]}")
        if not 1 <= x.shape[1] <= cfg.max_len:
            raise ValueError(
                f"input length {x.shape[1]} is outside [1, max_len={cfg.max_len}]; "
                "build the layer with a larger max_len"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"STU expects a floating-point input, got {x.dtype}")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Parallel (FFT) path. ``x: [B, L, d_in] -> [B, L, d_out]`` in ``config.dtype``."""
        self.check_input(x)
        cfg = self.config
        return stu_ops.stu_apply(
            self.params(),
            self.filters[: x.shape[1]],
            x.astype(cfg.dtype),
            two_branch=cfg.two_branch,
            projection=cfg.projector,
        )

    @property
    def length_limit(self) -> int:
        """``config.max_len``: the filters, hence prompt plus generated tokens, end there."""
        return self.config.max_len

    def init_cache(
        self, batch: int, max_len: int, dtype: Any, options: DecodeOptions = DEFAULT_DECODE
    ) -> STUCache:
        """Empty cache for ``batch`` sequences of at most ``max_len <= config.max_len`` tokens,
        fed inputs of ``dtype``; ``options`` choose the convolution's cache and block length."""
        cfg = self.config
        positive_int("STU.init_cache", "max_len", max_len)
        if max_len > cfg.max_len:
            raise ValueError(
                f"max_len={max_len} must be in [1, config.max_len={cfg.max_len}]: the STU's "
                "filters end there (distill the layer to decode without a limit)"
            )
        float_dtype("STU.init_cache", "cache dtype", dtype)
        projection, params = cfg.projector, self.params()
        conv = conv_decode.init_cache(
            options.strategy,
            projection,
            projection.stu_kernels(params, self.filters[...], cfg.two_branch),
            params,
            batch,
            max_len,
            projection.channels(cfg.d_in, cfg.d_out),
            dtype,
            options.block_len,
        )
        act = jnp.dtype(cfg.dtype)
        return STUCache(
            conv=conv,
            inputs=jnp.zeros((batch, max(cfg.k_u - 1, 0), cfg.d_in), act),
            outputs=jnp.zeros((batch, cfg.k_y, cfg.d_out), act),
        )

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: STUCache | None = None,
    ) -> tuple[jax.Array, STUCache]:
        """Run ``x: [B, T, d_in]`` at positions ``pos .. pos + T - 1``; returns ``(y [B, T,
        d_out], the cache at position pos + T)`` in ``config.dtype``.

        ``cache``: None (``pos`` = 0: an empty cache with room for ``config.max_len`` tokens in
        all, fed ``x.dtype``, as ``options`` say), or the cache of the positions before (from
        ``init_cache``, ``prefill`` or ``step``). The convolution continues from its history
        (:func:`spectral_jax.ops.conv_decode.extend`: FFT convolutions of the history and the
        chunk) and the AR terms from its input and output lags. Raises ValueError if ``pos + T``
        exceeds the cache's ``max_len`` (a runtime error under jit).

        ``pad`` (left-pad positions per row) needs no handling: the layer is causal and
        time-invariant, and the block feeds it zeros there, so the padding adds nothing.
        """
        del pad
        self.check_input(x)
        cfg = self.config
        if cache is None:
            cache = self.init_cache(x.shape[0], cfg.max_len, x.dtype, options)
        elif not isinstance(cache, STUCache):
            raise ValueError(f"STU.prefill: cache must be an STUCache, got {type(cache).__name__}")
        u = x.astype(cfg.dtype)
        params = self.params()
        conv, y = conv_decode.extend(cache.conv, cfg.projector.conv_input(params, u), params)
        y = y.astype(cfg.dtype)
        if cfg.k_u:
            y = y + stu_ops.input_ar(self.M_u[...], u, cache.inputs)
        if cfg.k_y:
            y = stu_ops.output_ar(self.M_y[...], y, cache.outputs)
        return y, STUCache(
            conv=conv,
            inputs=stu_ops.most_recent_first(u, cache.inputs),
            outputs=stu_ops.most_recent_first(y, cache.outputs),
        )

    def step(self, cache: STUCache, x_t: jax.Array) -> tuple[STUCache, jax.Array]:
        """One token ``x_t: [B, d_in]`` at position ``cache.conv.pos`` -> ``(next cache,
        y_t [B, d_out])`` in ``config.dtype``.

        Raises ValueError if the cache is full (a runtime error under jit), or if ``x_t``'s
        batch size, width or dtype does not match the cache.
        """
        cfg = self.config
        if not isinstance(cache, STUCache):
            raise ValueError(f"STU.step: cache must be an STUCache, got {type(cache).__name__}")
        batch, dtype = cache.inputs.shape[0], cache.conv.history.dtype
        if x_t.shape != (batch, cfg.d_in):
            raise ValueError(f"STU.step: x_t must be [{batch}, {cfg.d_in}], got {x_t.shape}")
        if x_t.dtype != dtype:
            raise ValueError(f"STU.step: x_t dtype {x_t.dtype} does not match cache {dtype}")
        u = x_t.astype(cfg.dtype)
        params = self.params()
        h_t = cfg.projector.conv_input(params, u).astype(dtype)
        conv, y = conv_decode.step(cache.conv, h_t, params)
        y = y.astype(cfg.dtype)
        m_u = self.M_u[...] if cfg.k_u else None
        m_y = self.M_y[...] if cfg.k_y else None
        y, inputs, outputs = stu_ops.ar_step(m_u, m_y, u, y, cache.inputs, cache.outputs)
        return STUCache(conv=conv, inputs=inputs, outputs=outputs), y
