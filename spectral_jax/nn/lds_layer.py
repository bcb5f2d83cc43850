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
outputs are a causal FFT convolution with the bank's own impulse responses, exactly as the STU
computes its outputs (:mod:`spectral_jax.ops.conv`); those kernels are formed once, on the host in
float64 (the bank's coefficients cancel, so forming them in float32 would lose digits), and
kept as a fixed variable of the bank's length ``max_len``. The state after the prompt is one
more pass, a matmul against decay powers (:func:`spectral_jax.ops.lds.driven_final_state`).
Positions past ``max_len`` continue from that state in blocks (plain: FFT convolution plus the
state's free response, a matmul against decay powers; compensated: the exact pair scan), so a
prompt may have any length at a cost linear in it. ``scan="parallel"`` / ``"sequential"``
compute every state by a scan instead (the tested alternatives). :meth:`LDSLayer.step`
advances the recurrence by one token.

The arithmetic of the recurrence and its readout is one object of
:mod:`spectral_jax.ops.lds_arithmetic`: ``"plain"`` float32 (default, ~2e-5 relative to the
float64 STU at L=8192, K=24, 120 states; float64 under ``jax.enable_x64`` for references) or
``"compensated"`` float32 pairs (~1e-7, the opt-in exact mode; float32 only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.convert import stu_to_lds
from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU, STU_PARAM_AXES, STUConfig
from spectral_jax.ops import lds, stu_ops
from spectral_jax.ops.lds_arithmetic import ARITHMETICS_BY_NAME, LDSArithmetic
from spectral_jax.validation import (
    ARITHMETICS,
    SCAN_KINDS,
    STATE_DTYPES,
    Arithmetic,
    ScanKind,
    float_dtype,
    one_of,
    positive_int,
)

HIGHEST = jax.lax.Precision.HIGHEST
# Positions past the kernels' length continue in blocks of this many, so the memory held at once
# (at most the compensated scan's states ``[B, TAIL_BLOCK, C, S, n]``) does not grow with the
# prompt.
TAIL_BLOCK = 2048


@dataclasses.dataclass(frozen=True)
class LDSConfig:
    """An :class:`LDSLayer`: the STU it was distilled from, and the arithmetic it runs in.

    Attributes:
      stu: the source layer's :class:`~spectral_jax.nn.stu.STUConfig` (shapes, projection, AR
        lags, dtypes; ``stu.max_len`` is the length the bank was fitted to). Its
        ``param_dtype`` is the dtype of the LDS parameters and states: float32, or float64 for
        references under ``jax.enable_x64`` (plain arithmetic only).
      arithmetic: ``"plain"`` (default) or ``"compensated"`` (float32 pairs; float32 only).
    """

    stu: STUConfig
    arithmetic: Arithmetic = "plain"

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

    @classmethod
    def for_stu(cls, stu: STUConfig, arithmetic: Arithmetic = "plain") -> LDSConfig:
        """The config of ``stu`` distilled in ``arithmetic``; parameters become float32 where the
        arithmetic needs it (compensated), else keep the STU's ``param_dtype``."""
        one_of("LDSConfig", "arithmetic", arithmetic, ARITHMETICS)
        allowed = ARITHMETICS_BY_NAME[arithmetic].param_dtypes
        if jnp.dtype(stu.param_dtype).name not in allowed:
            stu = dataclasses.replace(stu, param_dtype=jnp.dtype(allowed[0]))
        return cls(stu, arithmetic)

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


class LDSCache(NamedTuple):
    """Decode state: the LDS ``state`` ``[B, C, S, n]`` in the layer's arithmetic (one array for
    plain, a :class:`~spectral_jax.ops.lds_compensated.DoubleFloat` pair for compensated), the
    last ``k_u - 1`` inputs ``[B, k_u - 1, d_in]`` and the last ``k_y`` outputs
    ``[B, k_y, d_out]`` (most recent first)."""

    state: Any
    inputs: jax.Array
    outputs: jax.Array


class LDSDecays(nnx.Variable):
    """Fixed decays ``[S, n]`` of the distilled LDS (not trained)."""


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
        # filters; tensordot: the folded readout and its channels' kernels)
        weights, kernels = cfg.projector.lds_fixed(bank.responses(), bank.coeffs, params)
        # fixed arrays, replicated (the kernels are never split along time)
        readout = jnp.asarray(arithmetic.pack(weights, pdt))
        self.readout = LDSReadout(readout, logical_axes=(None,) * readout.ndim)
        self.kernels = LDSKernels(jnp.asarray(kernels, pdt), logical_axes=("time", None))

    @classmethod
    def from_stu(
        cls,
        stu: STU,
        bank: LDSBank | None = None,
        *,
        num_states: int = 120,
        arithmetic: Arithmetic = "plain",
    ) -> LDSLayer:
        """Distill ``stu``: fit (or take) a bank for its filters and convert its parameters."""
        cfg = stu.config
        if bank is None:
            bank, _ = fit_lds_bank(
                cfg.max_len, cfg.num_filters, cfg.variant, num_states, arithmetic=arithmetic
            )
        check_bank(bank, cfg)
        params = stu_to_lds(stu.params(), bank, cfg.projection)
        return cls(LDSConfig.for_stu(cfg, arithmetic), bank, params)

    @property
    def length_limit(self) -> None:
        """None: a recurrence has no length limit (prompts and decoding run to any length)."""
        return None

    # ---- shared pieces -------------------------------------------------------------------

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

    def _spectral_params(self) -> dict[str, jax.Array]:
        """The spectral parameters by name (``M_plus``/``M_minus`` or ``M_in``)."""
        cfg = self.config.stu
        shapes = cfg.projector.lds_param_shapes(
            cfg.num_filters, cfg.d_in, cfg.d_out, cfg.two_branch
        )
        return {name: getattr(self, name)[...] for name in shapes}

    def _drive(self, x: jax.Array) -> jax.Array:
        """LDS inputs ``[..., C]`` from layer inputs ``[..., d_in]``."""
        return self.config.stu.projector.conv_input(self._spectral_params(), x, HIGHEST)

    def _expand(self, drive: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every state's input ``[..., C, S, n]`` and decays ``[C, S, n]``, from ``[..., C]``."""
        decays = self.decays[...]
        u = jnp.broadcast_to(drive[..., None, None], drive.shape + decays.shape)
        return u, jnp.broadcast_to(decays, (drive.shape[-1], *decays.shape))

    def _read(self, states: Any) -> jax.Array:
        """Layer output before AR terms: ``states [..., C, S, n] -> [..., d_out]``."""
        arithmetic = self.config.lds_arithmetic
        weights = arithmetic.weights(self.readout[...])
        return self.config.stu.projector.lds_read(
            arithmetic, states, weights, self._spectral_params()
        )

    def _convolve(self, x: jax.Array) -> jax.Array:
        """Outputs before AR terms by FFT with the bank's kernels: ``x [B, T <= max_len, d_in]``."""
        kernels = self.kernels[: x.shape[1]]
        return self.config.stu.projector.convolve(self._drive(x), kernels, self._spectral_params())

    def _free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs before AR terms ``[B, length, d_out]`` of a plain ``state [B, C, S, n]`` with
        zero inputs: ``y[t] = sum_n w_n a_n^(t+1) x_n``."""
        weights = self.config.lds_arithmetic.weights(self.readout[...])
        t = jnp.arange(1, length + 1).reshape(length, 1, 1)
        decay_powers = lds.decay_powers(self.decays[...], t)  # [T, S, n]
        return self.config.stu.projector.free_response(
            decay_powers, state, weights, self._spectral_params()
        )

    def _convolved_block(self, state: jax.Array, xb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One block ``xb [B, T <= max_len, d_in]`` from a plain ``state``: FFT convolution plus
        the state's free response; the state after it by decay-power matmuls."""
        y = self._convolve(xb) + self._free_response(state, xb.shape[1])
        arithmetic = self.config.lds_arithmetic
        return arithmetic.final_state(self.decays[...], self._drive(xb), state), y

    def _scanned_block(self, state: Any, xb: jax.Array) -> tuple[Any, jax.Array]:
        """One block ``xb [B, T, d_in]`` from ``state`` by the arithmetic's parallel scan."""
        u, decays = self._expand(self._drive(xb))
        states = self.config.lds_arithmetic.scan("parallel", decays, u, state)
        return jax.tree.map(lambda s: s[:, -1], states), self._read(states)

    def _continue(self, x: jax.Array, state: Any) -> tuple[Any, jax.Array]:
        """Past the kernels' length: ``x [B, T, d_in]`` continues from ``state`` in blocks of
        :data:`TAIL_BLOCK` positions, or of the kernels' length if shorter (a ``lax.scan``
        over the whole blocks, then the rest), each the way the arithmetic's
        ``continuation`` says (:mod:`spectral_jax.ops.lds_arithmetic`), so memory does not
        grow with ``T``. Returns (the state after the last position, outputs before AR terms
        ``[B, T, d_out]``)."""
        block = {"convolution": self._convolved_block, "scan": self._scanned_block}[
            self.config.lds_arithmetic.continuation
        ]
        B, T, d_in = x.shape
        size = min(TAIL_BLOCK, self.config.stu.max_len)
        whole = T // size * size
        outputs = []
        if whole:
            blocks = x[:, :whole].reshape(B, whole // size, size, d_in).swapaxes(0, 1)
            state, ys = jax.lax.scan(block, state, blocks)  # ys: [count, B, block, d_out]
            outputs.append(ys.swapaxes(0, 1).reshape(B, whole, -1))
        if whole < T:
            state, y = block(state, x[:, whole:])
            outputs.append(y)
        return state, jnp.concatenate(outputs, axis=1)

    def _sequence(self, x: jax.Array, scan: ScanKind) -> tuple[jax.Array, Any]:
        """The one place the scan kind is chosen: ``x [B, T, d_in]`` -> (outputs before AR terms
        ``[B, T, d_out]``, state after position ``T - 1``)."""
        arithmetic = self.config.lds_arithmetic
        if scan == "fft":
            head = x[:, : self.config.stu.max_len]
            y = self._convolve(head)
            state = arithmetic.final_state(self.decays[...], self._drive(head))
            if x.shape[1] == head.shape[1]:
                return y, state
            state, tail = self._continue(x[:, head.shape[1] :], state)
            return jnp.concatenate([y, tail], axis=1), state
        u, decays = self._expand(self._drive(x))
        states = arithmetic.scan(scan, decays, u)
        return self._read(states), jax.tree.map(lambda s: s[:, -1], states)

    # ---- the four entry points -----------------------------------------------------------

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
        shape = (batch, self.config.channels, *self.decays.shape)
        return LDSCache(
            self.config.lds_arithmetic.zeros(shape, pdt),
            jnp.zeros((batch, max(cfg.k_u - 1, 0), cfg.d_in), pdt),
            jnp.zeros((batch, cfg.k_y, cfg.d_out), pdt),
        )

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        *,
        scan: ScanKind = "fft",
    ) -> tuple[jax.Array, LDSCache]:
        """Parallel path over a prompt ``x [B, L, d_in]`` (any ``L >= 1``) that also returns the
        decode cache after its last position.

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
        y, state = self._sequence(x, scan)
        m_u, m_y = self._lags()
        if m_u is not None:
            y = y + stu_ops.input_ar(m_u, x)
        if m_y is not None:
            y = stu_ops.output_ar(m_y, y)
        empty = self.init_cache(x.shape[0], 1)
        cache = LDSCache(
            state,
            stu_ops.most_recent_first(x, empty.inputs),
            stu_ops.most_recent_first(y, empty.outputs),
        )
        return y.astype(cfg.dtype), cache

    def step(self, cache: LDSCache, x_t: jax.Array) -> tuple[LDSCache, jax.Array]:
        """One token: ``x_t [B, d_in] -> y_t [B, d_out]``, O(1) time and memory in the position."""
        self._check_input(x_t, step=True)
        cfg = self.config.stu
        x_t = x_t.astype(cfg.param_dtype)
        u, decays = self._expand(self._drive(x_t))
        state = self.config.lds_arithmetic.step(decays, cache.state, u)
        y, inputs, outputs = stu_ops.ar_step(
            *self._lags(), x_t, self._read(state), cache.inputs, cache.outputs
        )
        return LDSCache(state, inputs, outputs), y.astype(cfg.dtype)
