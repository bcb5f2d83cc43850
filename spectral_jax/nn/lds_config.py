"""The config of a distilled layer (:class:`LDSConfig`) and the check that a bank fits an STU."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.reduce import channel_groups, reducible
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
      blocks: ``()`` for the bank's shared states ``[C, S, n]``; else each channel's real
        2-state blocks ``[C]`` of a per-channel reduction (:mod:`spectral_jax.distill.reduce`;
        tensordot projections in plain arithmetic only). Its channels run in :attr:`groups`,
        with one complex state ``[P_g, C_g]`` each (``x`` and ``y`` of every block).
    """

    stu: STUConfig
    arithmetic: Arithmetic = "plain"
    blocks: tuple[int, ...] = ()

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
        blocks = self.blocks
        if not isinstance(blocks, tuple) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocks
        ):
            raise ValueError(
                f"LDSConfig.blocks must be a tuple of positive integers, got {blocks!r}"
            )
        if blocks and not reducible(self.stu.projection, self.arithmetic):
            raise ValueError(
                f"LDSConfig.blocks: only tensordot layers in plain arithmetic are reduced per "
                f"channel, not {self.stu.projection} in {self.arithmetic}; use blocks=()"
            )
        if blocks and len(blocks) != self.channels:
            raise ValueError(
                f"LDSConfig.blocks has {len(blocks)} entries for {self.channels} channels"
            )

    @classmethod
    def for_stu(
        cls, stu: STUConfig, arithmetic: Arithmetic = "plain", blocks: tuple[int, ...] = ()
    ) -> LDSConfig:
        """The config of ``stu`` distilled in ``arithmetic`` (``blocks``: as the attribute);
        parameters become float32 where the arithmetic needs it (compensated), else keep the
        STU's ``param_dtype``."""
        one_of("LDSConfig", "arithmetic", arithmetic, ARITHMETICS)
        allowed = ARITHMETICS_BY_NAME[arithmetic].param_dtypes
        if jnp.dtype(stu.param_dtype).name not in allowed:
            stu = dataclasses.replace(stu, param_dtype=jnp.dtype(allowed[0]))
        return cls(stu, arithmetic, tuple(blocks))

    @property
    def lds_arithmetic(self) -> LDSArithmetic:
        return ARITHMETICS_BY_NAME[self.arithmetic]

    @property
    def slots(self) -> int:
        """The most blocks of any channel (0: not reduced): the padded checkpoint arrays'
        ``[C, slots, 2]``."""
        return max(self.blocks, default=0)

    @functools.cached_property
    def groups(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """The channel groups of a reduced layer, ``((channels, P_g), ...)``
        (:func:`~spectral_jax.distill.reduce.channel_groups`; ``()`` when not reduced)."""
        return channel_groups(self.blocks) if self.blocks else ()

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
