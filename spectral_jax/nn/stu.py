"""The Spectral Transform Unit as an nnx module: a thin shell over :mod:`spectral_jax.stu_ops`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax import stu_ops
from spectral_jax.filters import VARIANTS, max_num_filters, spectral_filters

PROJECTIONS = ("full", "tensordot")
ACTIVATION_DTYPES = ("float32", "bfloat16", "float64")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"STUConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class STUConfig:
    """Configuration of one STU layer.

    Attributes:
      d_in, d_out: input and output features.
      max_len: longest input; filters are computed for this length and inputs of length
        ``L <= max_len`` use their first ``L`` taps.
      num_filters: ``K``, the number of spectral filters per branch.
      variant: ``"standard"`` (plus and alternating-sign branches) or ``"hankel_l"`` (one branch).
      projection: ``"full"`` (``M: [2K, d_in, d_out]``) or ``"tensordot"`` (project inputs, then one
        learned filter mixture per output channel).
      k_u, k_y: number of autoregressive input / output lags (0 disables them).
      dtype: activation dtype; FFTs always run in at least float32.
      param_dtype: parameter (and filter) dtype: float32, or float64 for references under x64.
    """

    d_in: int
    d_out: int
    max_len: int
    num_filters: int = 24
    variant: str = "standard"
    projection: str = "full"
    k_u: int = 0
    k_y: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("d_in", "d_out", "num_filters"):
            _positive_int(name, getattr(self, name))
        _positive_int("max_len", self.max_len, minimum=2)
        _positive_int("k_u", self.k_u, minimum=0)
        _positive_int("k_y", self.k_y, minimum=0)
        if self.variant not in VARIANTS:
            raise ValueError(f"STUConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"STUConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}"
            )
        limit = max_num_filters(self.max_len, self.variant)
        if self.num_filters > limit:
            raise ValueError(
                f"STUConfig.num_filters={self.num_filters} exceeds {limit}, the most filters "
                f"available at max_len={self.max_len} ({self.variant})"
            )
        for name in ("dtype", "param_dtype"):
            if jnp.dtype(getattr(self, name)).name not in ACTIVATION_DTYPES:
                value = getattr(self, name)
                raise ValueError(
                    f"STUConfig.{name} must be one of {ACTIVATION_DTYPES}, got {value!r}"
                )

    @property
    def two_branch(self) -> bool:
        return self.variant == "standard"

    @property
    def tensordot(self) -> bool:
        return self.projection == "tensordot"


class SpectralFilters(nnx.Variable):
    """Fixed spectral filters ``[max_len, K]``: module state that is never trained."""


def make_filters(config: STUConfig) -> SpectralFilters:
    """The filter variable for ``config``; pass it to several layers to share one copy."""
    phi, _ = spectral_filters(config.max_len, config.num_filters, config.variant)
    return SpectralFilters(jnp.asarray(phi, dtype=config.param_dtype))


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

        if config.tensordot:
            self.M_in = normal((d_in, d_out), d_in)
            self.M_filt_plus = normal((K, d_out), K)
            if config.two_branch:
                self.M_filt_minus = normal((K, d_out), K)
        else:
            self.M_plus = normal((K, d_in, d_out), d_in)
            if config.two_branch:
                self.M_minus = normal((K, d_in, d_out), d_in)
        if config.k_u:
            self.M_u = normal((config.k_u, d_in, d_out), d_in * config.k_u)
        if config.k_y:
            # Zero init: the output recurrence starts as the identity map (stable).
            self.M_y = nnx.Param(jnp.zeros((config.k_y, d_out, d_out), pdt))

    def params(self) -> dict[str, jax.Array]:
        """The learned parameter arrays by name (the keys :mod:`spectral_jax.stu_ops` expects)."""
        return {
            name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)
        }

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
            tensordot=cfg.tensordot,
        )
