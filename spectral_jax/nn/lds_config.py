"""The config of a distilled layer (:class:`LDSConfig`) and the check that a bank fits an STU."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.reduce import reducible
from spectral_jax.nn.stu import STUConfig
from spectral_jax.ops.lds_arithmetic import ARITHMETICS_BY_NAME, LDSArithmetic
from spectral_jax.validation import ARITHMETICS, STATE_DTYPES, Arithmetic, float_dtype, one_of


@dataclasses.dataclass(frozen=True)
class LDSConfig:
    """A distilled layer (:class:`~spectral_jax.nn.lds_layer.LDSLayer`): the STU it was
    distilled from, and the arithmetic it runs in.

    Attributes:
      stu: the source layer's :class:`~spectral_jax.nn.stu.STUConfig` (shapes, projection, AR
        lags, dtypes; ``stu.max_len`` is the length the bank was fitted to). Its
        ``param_dtype`` is the dtype of the LDS parameters and states: float32, or float64 for
        references under ``jax.enable_x64`` (plain arithmetic only).
      arithmetic: ``"plain"`` (default) or ``"compensated"`` (float32 pairs; float32 only).
      slots: 0 for the bank's shared states ``[C, S, n]``; else the real 2-state blocks per
        channel of a per-channel reduction (:mod:`spectral_jax.distill.reduce`), states
        ``[2, slots, C]`` (tensordot projections in plain arithmetic only).
    """

    stu: STUConfig
    arithmetic: Arithmetic = "plain"
    slots: int = 0

    def __post_init__(self):
        if not isinstance(self.stu, STUConfig):
            raise ValueError(f"LDSConfig.stu must be an STUConfig, got {type(self.stu).__name__}")
        one_of("LDSConfig", "arithmetic", self.arithmetic, ARITHMETICS)
        float_dtype("LDSConfig", "stu.param_dtype", self.stu.param_dtype, STATE_DTYPES)
        float_dtype(
            f"LDSConfig(arithmetic={self.arithmetic!r})",
            "stu.param_dtype",
            self.stu.param_dtype,
            self.lds_arithmetic.param_dtypes,
        )
        if not isinstance(self.slots, int) or isinstance(self.slots, bool) or self.slots < 0:
            raise ValueError(f"LDSConfig.slots must be a non-negative integer, got {self.slots!r}")
        if self.slots and not reducible(self.stu.projection, self.arithmetic):
            raise ValueError(
                f"LDSConfig.slots={self.slots}: only tensordot layers in plain arithmetic are "
                f"reduced per channel, not {self.stu.projection} in {self.arithmetic}; use slots=0"
            )

    @classmethod
    def for_stu(cls, stu: STUConfig, arithmetic: Arithmetic = "plain", slots: int = 0) -> LDSConfig:
        """The config of ``stu`` distilled in ``arithmetic`` (``slots``: as the attribute);
        parameters become float32 where the arithmetic needs it (compensated), else keep the
        STU's ``param_dtype``."""
        one_of("LDSConfig", "arithmetic", arithmetic, ARITHMETICS)
        allowed = ARITHMETICS_BY_NAME[arithmetic].param_dtypes
        if jnp.dtype(stu.param_dtype).name not in allowed:
            stu = dataclasses.replace(stu, param_dtype=jnp.dtype(allowed[0]))
        return cls(stu, arithmetic, slots)

    @property
    def lds_arithmetic(self) -> LDSArithmetic:
        return ARITHMETICS_BY_NAME[self.arithmetic]

    @property
    def channels(self) -> int:
        """Channels that drive an LDS: ``d_in`` (full) or ``d_out`` (tensordot)."""
        return self.stu.projector.channels(self.stu.d_in, self.stu.d_out)

    def param_shapes(self, num_filters: int) -> dict[str, tuple[int, ...]]:
        """The learned parameters a layer of this config has, by name."""
        cfg = self.stu
        d_in, d_out = cfg.d_in, cfg.d_out
        shapes = cfg.projector.lds_param_shapes(num_filters, d_in, d_out, cfg.two_branch)
        if cfg.k_u:
            shapes["M_u"] = (cfg.k_u, d_in, d_out)
        if cfg.k_y:
            shapes["M_y"] = (cfg.k_y, d_out, d_out)
        return shapes


def check_bank(bank: LDSBank, stu: STUConfig) -> None:
    """Raise ``ValueError`` unless ``bank`` was fitted to ``stu``'s filters."""
    if (bank.seq_len, bank.num_filters, bank.variant) != (
        stu.max_len,
        stu.num_filters,
        stu.variant,
    ):
        raise ValueError(
            f"bank (L={bank.seq_len}, K={bank.num_filters}, {bank.variant}) does not match "
            f"the STU (max_len={stu.max_len}, K={stu.num_filters}, {stu.variant})"
        )
