"""The distilled STU: a diagonal LDS per channel, as a flax.nnx module.

An :class:`LDSLayer` computes what an STU computes, with every spectral convolution replaced by
the bank's LDS (:mod:`spectral_jax.distill.fit`): constant time and memory per generated token.

* full mode: each input channel drives ``S * n`` states (``S`` = 2 branches for the standard
  variant, decays ``a`` and ``-a``); the bank's ``coeffs`` read out the ``S * K`` filter outputs,
  which the STU's own ``M_plus``/``M_minus`` project, exactly as in the STU;
* tensordot mode: the inputs are projected by ``M_in`` first, and each of the ``d_out`` channels
  reads its states out with its own folded coefficients ``readout[o] = coeffs @ M_filt[:, o]``;
* AR terms are the STU's (:mod:`spectral_jax.ops.stu_ops`).

Prefill is a convolution, decoding a recurrence. Over a prompt (``scan="fft"``, the default) the
outputs are a causal FFT convolution with the bank's own impulse responses, formed once on the
host in float64 (the bank's coefficients cancel, so forming them in float32 would lose digits)
and kept as a fixed variable of the bank's length ``max_len``; the state after the prompt is a
matmul against decay powers, and positions past ``max_len`` continue from it in blocks
(:mod:`spectral_jax.ops.lds_continuation`), so a prompt may have any length at a cost linear in
it. ``scan="parallel"`` / ``"sequential"`` compute every state by a scan instead (the tested
alternatives). :meth:`LDSLayer.step` advances the recurrence by one token.

This module holds the parameters and the decode API; the math is
:class:`spectral_jax.ops.distilled_lds.DistilledLDS`, over the projection's and the arithmetic's
objects (:mod:`spectral_jax.ops.projection`, :mod:`spectral_jax.ops.lds_arithmetic`). The
arithmetic of the recurrence and its readout is ``"plain"`` float32 (default, ~2e-5 relative to the
float64 STU at L=8192, K=24, 120 states; float64 under ``jax.enable_x64`` for references) or
``"compensated"`` float32 pairs (~1e-7, the opt-in exact mode; float32 only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.block_tables import group_tables
from spectral_jax.distill.convert import stu_to_lds
from spectral_jax.distill.fit import DEFAULT_NUM_STATES, fit_lds_bank
from spectral_jax.distill.reduce import (
    DEFAULT_TOL,
    block_counts,
    reduce_readout,
    reducible,
)
from spectral_jax.nn.lds_config import LDSConfig, check_bank
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU, STU_PARAM_AXES
from spectral_jax.ops import lds, lds_continuation, stu_ops
from spectral_jax.ops.distilled_lds import DistilledLDS, ReducedLDS
from spectral_jax.validation import SCAN_KINDS, Arithmetic, ScanKind, one_of, positive_int


class LDSCache(NamedTuple):
    """Decode state: the LDS ``state`` ``[B, C, S, n]`` in the layer's arithmetic (one array for
    plain, a :class:`~spectral_jax.ops.lds_compensated.DoubleFloat` pair for compensated;
    per channel group, one complex array ``[B, P_g, C_g]`` holding each block's two real
    states for a reduced layer), the
    last ``k_u - 1`` inputs ``[B, k_u - 1, d_in]`` and the last ``k_y`` outputs
    ``[B, k_y, d_out]`` (most recent first)."""

    state: Any
    inputs: jax.Array
    outputs: jax.Array


class LDSDecays(nnx.Variable):
    """Fixed decays ``[S, n]`` of the distilled LDS (not trained); a reduced layer's block table
    ``[11, S]``: its channel groups' tables, flattened
    (:func:`~spectral_jax.distill.block_tables.group_tables`)."""


class LDSReadout(nnx.Variable):
    """Fixed readout coefficients as stored words ``[words, ...]`` of the arithmetic."""


class LDSKernels(nnx.Variable):
    """Fixed convolution kernels of the prefill, ``[max_len, F]``, computed in float64."""


class LDSLayer(nnx.Module):
    """Distilled STU layer ``[B, L, d_in] -> [B, L, d_out]``; build it with :meth:`from_stu`."""

    def __init__(self, config: LDSConfig, bank: LDSBank, params: dict[str, Any]):
        """``params``: LDS-layer parameters from :func:`spectral_jax.distill.convert.stu_to_lds`."""
        self.config = config
        cfg = config.stu
        check_bank(bank, cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        arithmetic = config.lds_arithmetic
        self.decays = LDSDecays(jnp.asarray(bank.branch_decays(), pdt), logical_axes=(None, None))
        for name, shape in config.param_shapes(bank.num_filters).items():
            if name not in params:
                raise ValueError(f"LDSLayer parameters lack {name}")
            if tuple(np.shape(params[name])) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {np.shape(params[name])}")
            param = nnx.Param(jnp.asarray(params[name], pdt), logical_axes=STU_PARAM_AXES[name])
            setattr(self, name, param)
        # readout weights and kernels in float64 on the host (full: the bank's coeffs and
        # filters; tensordot: the folded readout and its channels' kernels; reduced: each
        # channel's slots)
        if config.blocks:
            table, weights, kernels = self._reduced_arrays(config, params)
            self.decays = LDSDecays(jnp.asarray(table, pdt), logical_axes=(None, None))
        else:
            weights, kernels = cfg.projector.lds_fixed(bank.responses(), bank.coeffs, params)
        # fixed arrays, replicated (the kernels are never split along time)
        readout = jnp.asarray(arithmetic.pack(weights, pdt))
        self.readout = LDSReadout(readout, logical_axes=(None,) * readout.ndim)
        self.kernels = LDSKernels(jnp.asarray(kernels, pdt), logical_axes=("time", None))

    @staticmethod
    def _reduced_arrays(config: LDSConfig, params: dict[str, Any]) -> tuple:
        """The reduced layer's float64 ``(decay table [11, S], readout [2, S], kernels)`` of its
        channel groups (:func:`~spectral_jax.distill.block_tables.group_tables`) from its blocks
        ``params["reduced_decays"]`` (complex), ``params["reduced_readout"]`` (real), both
        ``[C, slots, 2]`` (:func:`~spectral_jax.distill.reduce.pack_blocks`)."""
        shape = (config.channels, config.slots, 2)
        for name in ("reduced_decays", "reduced_readout"):
            if name not in params or np.shape(params[name]) != shape:
                raise ValueError(
                    f"a reduced LDSLayer needs {name} of shape {shape}, got "
                    f"{np.shape(params[name]) if name in params else 'none'}"
                )
        mu, weights = params["reduced_decays"], params["reduced_readout"]
        # a template's blocks are zeros (the checkpoint's arrays are restored into it)
        if block_counts(mu, weights) != config.blocks and np.any(mu != 0):
            raise ValueError(
                f"the reduced blocks' counts per channel differ from the config's blocks "
                f"{config.blocks}"
            )
        return group_tables(mu, weights, config.groups, config.stu.max_len)

    @classmethod
    def from_stu(
        cls,
        stu: STU,
        bank: LDSBank | None = None,
        *,
        num_states: int = DEFAULT_NUM_STATES,
        arithmetic: Arithmetic = "plain",
        tol: float | None = DEFAULT_TOL,
        max_states: int | None = None,
    ) -> LDSLayer:
        """Distill ``stu``: fit (or take) a bank for its filters and convert its parameters
        (:func:`distill_stu`, whose reduction report this drops)."""
        return distill_stu(
            stu, bank, num_states=num_states, arithmetic=arithmetic, tol=tol, max_states=max_states
        )[0]

    @property
    def length_limit(self) -> None:
        """None: a recurrence has no length limit (prompts and decoding run to any length)."""
        return None

    def _check_input(self, x: jax.Array, step: bool) -> None:
        d_in = self.config.stu.d_in
        expected = f"[batch, {d_in}]" if step else f"[batch, length, {d_in}]"
        if x.ndim != (2 if step else 3) or x.shape[-1] != d_in or (not step and x.shape[1] < 1):
            raise ValueError(f"LDSLayer expects input {expected}, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"LDSLayer expects a floating-point input, got {x.dtype}")

    def _lags(self) -> tuple[jax.Array | None, jax.Array | None]:
        """``(M_u, M_y)``, None where the config has no such lags."""
        cfg = self.config.stu
        return (self.M_u[...] if cfg.k_u else None), (self.M_y[...] if cfg.k_y else None)

    def _system(self) -> DistilledLDS:
        """The layer's LDS over its current arrays (:mod:`spectral_jax.ops.distilled_lds`):
        reduced per channel when the config has slots, else over the shared bank."""
        cfg = self.config.stu
        shapes = cfg.projector.lds_param_shapes(
            cfg.num_filters, cfg.d_in, cfg.d_out, cfg.two_branch
        )
        arrays = (
            cfg.projector,
            self.config.lds_arithmetic,
            self.decays[...],
            self.readout[...],
            self.kernels[...],
            {name: getattr(self, name)[...] for name in shapes},
        )
        if self.config.blocks:
            return ReducedLDS(*arrays, layout=self.config.groups)
        return DistilledLDS(*arrays)

    def __call__(self, x: jax.Array, *, scan: ScanKind = "fft") -> jax.Array:
        """Parallel path: ``x [B, L, d_in] -> [B, L, d_out]`` in ``config.stu.dtype``, any
        ``L >= 1``; ``scan`` as in :meth:`prefill`."""
        return self.prefill(x, scan=scan)[0]

    def init_cache(
        self,
        batch: int,
        max_len: int,
        dtype: Any = None,
        options: DecodeOptions = DEFAULT_DECODE,
    ) -> LDSCache:
        """Empty cache for ``batch`` sequences. The LDS state does not grow with ``max_len``
        (accepted for the common decode API; must be a positive integer); ``dtype`` and
        ``options`` do not concern the recurrence (states live in the parameter dtype)."""
        del dtype, options
        positive_int("LDSLayer.init_cache", "batch", batch)
        positive_int("LDSLayer.init_cache", "max_len", max_len)
        cfg, pdt = self.config.stu, jnp.dtype(self.config.stu.param_dtype)
        return LDSCache(
            self._system().zeros(batch, self.config.channels),
            jnp.zeros((batch, max(cfg.k_u - 1, 0), cfg.d_in), pdt),
            jnp.zeros((batch, cfg.k_y, cfg.d_out), pdt),
        )

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: LDSCache | None = None,
        *,
        scan: ScanKind = "fft",
    ) -> tuple[jax.Array, LDSCache]:
        """Parallel path over ``x [B, T, d_in]`` (any ``T >= 1``) that also returns the decode
        cache after its last position.

        ``cache``: None (the prompt starts at position 0), or the cache of the positions before
        (from ``init_cache``, ``prefill`` or ``step``): the outputs continue from its state, in
        blocks of bounded memory (:func:`spectral_jax.ops.lds_continuation.continue_in_blocks`,
        for ``scan="fft"``), and the AR terms from its input and output histories.
        ``scan``: ``"fft"`` (default: FFT convolution plus a decay-power matmul for the state),
        ``"parallel"`` or ``"sequential"`` (every state by a scan; slower alternatives).
        ``options`` do not concern the recurrence, and ``pad`` (left-pad positions per row) needs
        no handling: the layer is causal and time-invariant and the block feeds it zeros there,
        which leave its state at zero.
        """
        del options, pad
        self._check_input(x, step=False)
        one_of("LDSLayer.prefill", "scan", scan, SCAN_KINDS)
        cfg = self.config.stu
        x = x.astype(cfg.param_dtype)
        system = self._system()
        if cache is None:
            cache = self.init_cache(x.shape[0], 1)
            y, state = system.sequence(x, scan)
        elif scan == "fft":
            state, y = lds_continuation.continue_in_blocks(system, x, cache.state)
        else:
            states = system.scan(scan, x, cache.state)
            y, state = system.read(states), lds.last_state(states)
        m_u, m_y = self._lags()
        if m_u is not None:
            y = y + stu_ops.input_ar(m_u, x, cache.inputs)
        if m_y is not None:
            y = stu_ops.output_ar(m_y, y, cache.outputs)
        cache = LDSCache(
            state,
            stu_ops.most_recent_first(x, cache.inputs),
            stu_ops.most_recent_first(y, cache.outputs),
        )
        return y.astype(cfg.dtype), cache

    def step(self, cache: LDSCache, x_t: jax.Array) -> tuple[LDSCache, jax.Array]:
        """One token: ``x_t [B, d_in] -> y_t [B, d_out]``, O(1) time and memory in the position."""
        self._check_input(x_t, step=True)
        cfg = self.config.stu
        x_t = x_t.astype(cfg.param_dtype)
        state, y = self._system().step(cache.state, x_t)
        y, inputs, outputs = stu_ops.ar_step(*self._lags(), x_t, y, cache.inputs, cache.outputs)
        return LDSCache(state, inputs, outputs), y.astype(cfg.dtype)


def distill_stu(
    stu: STU,
    bank: LDSBank | None = None,
    *,
    num_states: int = DEFAULT_NUM_STATES,
    arithmetic: Arithmetic = "plain",
    tol: float | None = DEFAULT_TOL,
    max_states: int | None = None,
    blocks: Sequence[int] | None = None,
) -> tuple[LDSLayer, dict[str, Any] | None]:
    """Distill ``stu`` into an :class:`LDSLayer` and its reduction report.

    A tensordot STU in plain arithmetic is reduced per channel
    (:func:`~spectral_jax.distill.reduce.reduce_channels`) to a relative kernel error of at most
    ``tol`` at its ``max_len`` (and at most ``max_states`` states per channel); ``tol=None``
    keeps the bank's shared states, and so do full projections and compensated layers (their
    report is None). ``blocks``: build an empty reduced layer of these blocks per channel instead
    (a template that a checkpoint's arrays are restored into; nothing is reduced).
    """
    cfg = stu.config
    if bank is None:
        bank, _ = fit_lds_bank(
            cfg.max_len, cfg.num_filters, cfg.variant, num_states, arithmetic=arithmetic
        )
    check_bank(bank, cfg)
    params = stu_to_lds(stu.params(), bank, cfg.projection)
    if tol is None or not reducible(cfg.projection, arithmetic):
        return LDSLayer(LDSConfig.for_stu(cfg, arithmetic), bank, params), None
    if blocks is not None:
        config = LDSConfig.for_stu(cfg, arithmetic, tuple(blocks))
        zeros = np.zeros((config.channels, config.slots, 2))
        params = {**params, "reduced_decays": zeros + 0j, "reduced_readout": zeros}
        return LDSLayer(config, bank, params), None
    reduced = reduce_readout(params["readout"], bank.branch_decays(), cfg.max_len, tol, max_states)
    mu, weights = reduced.blocks()
    params = {**params, "reduced_decays": mu, "reduced_readout": weights}
    config = LDSConfig.for_stu(cfg, arithmetic, block_counts(mu, weights))
    layer = LDSLayer(config, bank, params)
    padded = sum(slots * len(channels) for channels, slots in config.groups)
    summary = {"tol": tol, "max_states": max_states, **reduced.summary()}
    return layer, {**summary, "groups": len(config.groups), "state_floats": 2 * padded}
