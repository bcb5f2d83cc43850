"""The distilled STU: a diagonal LDS per channel, as a flax.nnx module.

An :class:`LDSLayer` computes what an STU computes, with every spectral convolution replaced by
the bank's LDS (:mod:`spectral_jax.distill`): constant time and memory per generated token.

* full mode: each input channel drives ``S * n`` states (``S`` = 2 branches for the standard
  variant, decays ``a`` and ``-a``); the bank's ``coeffs`` read out the ``S * K`` filter outputs,
  which the STU's own ``M_plus``/``M_minus`` project, exactly as in the STU;
* tensordot mode: the inputs are projected by ``M_in`` first, and each of the ``d_out`` channels
  reads its states out with its own folded coefficients ``readout[o] = coeffs @ M_filt[:, o]``;
* AR terms are the STU's (:func:`spectral_jax.ops.stu_ops.input_ar` / ``output_ar``).

``arithmetic="compensated"`` (default) carries the states as float32 pairs and accumulates the
readout without rounding (:mod:`spectral_jax.ops.lds_compensated`): the cancelling coefficients then
cost no accuracy, and a float32 layer matches the float64 STU to ~1e-7 relative.
``arithmetic="plain"`` is the textbook float32 recurrence (~1e-5 for K=24; fastest), and runs in
float64 when ``param_dtype`` is float64 (references under ``jax.enable_x64``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.distill import LDSBank, fit_lds_bank, stu_to_lds
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU
from spectral_jax.ops import lds, stu_ops
from spectral_jax.ops import lds_compensated as lc

ARITHMETICS = ("compensated", "plain")
PARAM_DTYPES = ("float32", "float64")
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LDSConfig:
    """Shape and arithmetic of an :class:`LDSLayer`.

    Attributes:
      d_in, d_out, max_len, projection, k_u, k_y, dtype: as in
        :class:`spectral_jax.nn.stu.STUConfig` (``max_len`` is the filter length the bank was
        fitted to: the longest parallel input).
      arithmetic: ``"compensated"`` (float32 pairs, needs float32 parameters) or ``"plain"``.
      param_dtype: float32, or float64 for references under ``jax.enable_x64`` (plain only).
    """

    d_in: int
    d_out: int
    max_len: int
    projection: str = "full"
    k_u: int = 0
    k_y: int = 0
    arithmetic: str = "compensated"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name, minimum in (("d_in", 1), ("d_out", 1), ("max_len", 2), ("k_u", 0), ("k_y", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"LDSConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.projection not in ("full", "tensordot"):
            raise ValueError(
                f"LDSConfig.projection must be 'full' or 'tensordot', got {self.projection!r}"
            )
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(
                f"LDSConfig.arithmetic must be one of {ARITHMETICS}, got {self.arithmetic!r}"
            )
        if jnp.dtype(self.param_dtype).name not in PARAM_DTYPES:
            raise ValueError(
                f"LDSConfig.param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}"
            )
        if self.arithmetic == "compensated" and jnp.dtype(self.param_dtype) != jnp.float32:
            raise ValueError(
                "LDSConfig.arithmetic='compensated' is float32 arithmetic; got param_dtype "
                f"{jnp.dtype(self.param_dtype).name} (use arithmetic='plain')"
            )

    @property
    def channels(self) -> int:
        """Channels that drive an LDS: ``d_in`` (full) or ``d_out`` (tensordot)."""
        return self.d_out if self.projection == "tensordot" else self.d_in


class LDSCache(NamedTuple):
    """Decode state: LDS states ``hi + lo`` ``[B, C, S, n]`` (``lo`` is zero in plain mode),
    the last ``k_u - 1`` inputs ``[B, k_u - 1, d_in]`` and the last ``k_y`` outputs
    ``[B, k_y, d_out]`` (most recent first)."""

    state_hi: jax.Array
    state_lo: jax.Array
    inputs: jax.Array
    outputs: jax.Array


class LDSDecays(nnx.Variable):
    """Fixed decays ``[S, n]`` of the distilled LDS (not trained)."""


class LDSReadout(nnx.Variable):
    """Fixed readout coefficients, split as float32 ``hi`` + ``lo`` (or float64 ``hi``, 0)."""


class LDSLayer(nnx.Module):
    """Distilled STU layer ``[B, L, d_in] -> [B, L, d_out]``; build it with :meth:`from_stu`."""

    def __init__(self, config: LDSConfig, bank: LDSBank, params: dict[str, Any]):
        """``params``: LDS-layer parameters from :func:`spectral_jax.distill.stu_to_lds`."""
        self.config = config
        if bank.seq_len != config.max_len:
            raise ValueError(f"bank fitted to L={bank.seq_len}, config.max_len={config.max_len}")
        pdt = jnp.dtype(config.param_dtype)
        self.decays = LDSDecays(jnp.asarray(bank.branch_decays(), pdt))
        if config.projection == "tensordot":
            weights = np.asarray(params["readout"], np.float64)  # [d_out, S, n]
            expected = (config.d_out, *bank.branch_decays().shape)
            if weights.shape != expected:
                raise ValueError(f"readout must have shape {expected}, got {weights.shape}")
            weights = weights.reshape(config.d_out, -1, 1)  # [C, S * n, 1]
        else:
            weights = bank.coeffs  # [n, K]
        hi, lo = _split(weights, pdt)
        self.readout_hi, self.readout_lo = LDSReadout(hi), LDSReadout(lo)
        K, d_in, d_out = bank.num_filters, config.d_in, config.d_out
        shapes = {"M_in": (d_in, d_out)} if config.projection == "tensordot" else {}
        if config.projection == "full":
            shapes.update({name: (K, d_in, d_out) for name in ("M_plus", "M_minus")})
            if bank.num_branches == 1:
                del shapes["M_minus"]
        if config.k_u:
            shapes["M_u"] = (config.k_u, d_in, d_out)
        if config.k_y:
            shapes["M_y"] = (config.k_y, d_out, d_out)
        for name, shape in shapes.items():
            if name not in params:
                raise ValueError(f"LDSLayer parameters lack {name}")
            if tuple(np.shape(params[name])) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {np.shape(params[name])}")
            setattr(self, name, nnx.Param(jnp.asarray(params[name], pdt)))

    @classmethod
    def from_stu(
        cls,
        stu: STU,
        bank: LDSBank | None = None,
        *,
        num_states: int = 120,
        arithmetic: str = "compensated",
    ) -> LDSLayer:
        """Distill ``stu``: fit (or take) a bank for its filters and convert its parameters."""
        cfg = stu.config
        if bank is None:
            bank, _ = fit_lds_bank(
                cfg.max_len, cfg.num_filters, cfg.variant, num_states, arithmetic=arithmetic
            )
        if (bank.seq_len, bank.num_filters, bank.variant) != (
            cfg.max_len,
            cfg.num_filters,
            cfg.variant,
        ):
            raise ValueError(
                f"bank (L={bank.seq_len}, K={bank.num_filters}, {bank.variant}) does not match "
                f"the STU (max_len={cfg.max_len}, K={cfg.num_filters}, {cfg.variant})"
            )
        params = stu_to_lds(stu.params(), bank, tensordot=cfg.tensordot)
        config = LDSConfig(
            d_in=cfg.d_in,
            d_out=cfg.d_out,
            max_len=cfg.max_len,
            projection=cfg.projection,
            k_u=cfg.k_u,
            k_y=cfg.k_y,
            arithmetic=arithmetic,
            dtype=cfg.dtype,
            param_dtype=jnp.float32 if arithmetic == "compensated" else cfg.param_dtype,
        )
        return cls(config, bank, params)

    # ---- shared pieces -------------------------------------------------------------------

    def _check_input(self, x: jax.Array, step: bool) -> None:
        cfg = self.config
        expected = f"[batch, {cfg.d_in}]" if step else f"[batch, length, {cfg.d_in}]"
        if x.ndim != (2 if step else 3) or x.shape[-1] != cfg.d_in:
            raise ValueError(f"LDSLayer expects input {expected}, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"LDSLayer expects a floating-point input, got {x.dtype}")
        if not step and not 1 <= x.shape[1] <= cfg.max_len:
            raise ValueError(f"input length {x.shape[1]} is outside [1, max_len={cfg.max_len}]")

    def _drive(self, x: jax.Array) -> jax.Array:
        """LDS inputs ``[..., C]`` from layer inputs ``[..., d_in]``."""
        if self.config.projection == "tensordot":
            return jnp.matmul(x, self.M_in[...], precision=HIGHEST)
        return x

    def _read(self, states: lc.DoubleFloat) -> jax.Array:
        """Layer output before AR terms: ``states [..., C, S, n] -> [..., d_out]`` (plain
        arithmetic reads ``states.hi`` only; its ``lo`` may be None)."""
        cfg = self.config
        weights = lc.DoubleFloat(self.readout_hi[...], self.readout_lo[...])
        lead = states.hi.shape[:-3]
        if cfg.projection == "tensordot":
            flat = lc.DoubleFloat(
                *(None if s is None else s.reshape(*lead, cfg.d_out, -1) for s in states)
            )
            return self._contract(flat, weights)[..., 0]
        features = self._contract(states, weights)  # [..., C, S, K]
        features = features.reshape(*lead, cfg.d_in, -1)
        m = stu_ops.spectral_weights(
            {
                name: getattr(self, name)[...]
                for name in ("M_plus", "M_minus")
                if hasattr(self, name)
            },
            two_branch=hasattr(self, "M_minus"),
        )  # [S * K, d_in, d_out]
        return jnp.einsum("...cf,fco->...o", features, m, precision=HIGHEST)

    def _contract(self, states: lc.DoubleFloat, weights: lc.DoubleFloat) -> jax.Array:
        if self.config.arithmetic == "compensated":
            return lc.readout(states, weights)
        return jnp.matmul(states.hi[..., None, :], weights.hi, precision=HIGHEST)[..., 0, :]

    def _states(self, drive: jax.Array) -> lc.DoubleFloat:
        """Parallel scan: ``drive [B, L, C] -> states [B, L, C, S, n]`` (``lo`` None if plain)."""
        decays = self.decays[...]
        u = jnp.broadcast_to(drive[..., None, None], drive.shape + decays.shape)
        decays = jnp.broadcast_to(decays, u.shape[2:])
        if self.config.arithmetic == "compensated":
            return lc.parallel_scan(decays, u)
        states = lds.parallel_scan(decays, u)
        return lc.DoubleFloat(states, None)

    # ---- the four entry points -----------------------------------------------------------

    def __call__(self, x: jax.Array) -> jax.Array:
        """Parallel path: ``x [B, L, d_in] -> [B, L, d_out]`` in ``config.dtype``."""
        return self.prefill(x)[0]

    @property
    def length_limit(self) -> None:
        """None: the recurrence decodes any number of tokens with a constant-size state."""
        return None

    def init_cache(
        self, batch: int, max_len: int, dtype: Any = None, options: DecodeOptions = DEFAULT_DECODE
    ) -> LDSCache:
        """Empty cache for ``batch`` sequences. The LDS state does not grow with ``max_len``
        (accepted for the common decode API; must be a positive integer); the recurrence has
        no decode options."""
        del dtype, options  # states live in param_dtype; outputs are cast on return
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        cfg, pdt = self.config, jnp.dtype(self.config.param_dtype)
        zeros = jnp.zeros((batch, cfg.channels, *self.decays.shape), pdt)
        return LDSCache(
            zeros,
            zeros,
            jnp.zeros((batch, max(cfg.k_u - 1, 0), cfg.d_in), pdt),
            jnp.zeros((batch, cfg.k_y, cfg.d_out), pdt),
        )

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
    ) -> tuple[jax.Array, LDSCache]:
        """Parallel path that also returns the decode cache after the last position.

        ``pad`` (left-pad positions per row) needs no handling: the recurrence is causal and
        time-invariant and the block feeds it zeros there, which leave its state at zero."""
        del options, pad
        self._check_input(x, step=False)
        cfg = self.config
        x = x.astype(cfg.param_dtype)
        states = self._states(self._drive(x))
        y = self._read(states)
        if cfg.k_u:
            y = y + stu_ops.input_ar(self.M_u[...], x)
        if cfg.k_y:
            y = stu_ops.output_ar(self.M_y[...], y)
        cache = self.init_cache(x.shape[0], cfg.max_len)
        cache = LDSCache(
            states.hi[:, -1],
            cache.state_lo if states.lo is None else states.lo[:, -1],
            _recent(x, cache.inputs),
            _recent(y, cache.outputs),
        )
        return y.astype(cfg.dtype), cache

    def step(self, cache: LDSCache, x_t: jax.Array) -> tuple[LDSCache, jax.Array]:
        """One token: ``x_t [B, d_in] -> y_t [B, d_out]``, O(1) time and memory in the position."""
        self._check_input(x_t, step=True)
        cfg = self.config
        x_t = x_t.astype(cfg.param_dtype)
        drive = self._drive(x_t)
        decays = self.decays[...]
        u = jnp.broadcast_to(drive[..., None, None], drive.shape + decays.shape)
        decays = jnp.broadcast_to(decays, u.shape[1:])
        if cfg.arithmetic == "compensated":
            state = lc.step(decays, lc.DoubleFloat(cache.state_hi, cache.state_lo), u)
        else:
            state = lc.DoubleFloat(lds.step(decays, cache.state_hi, u), cache.state_lo)
        y = self._read(state)
        if cfg.k_u:
            lagged = jnp.concatenate([x_t[:, None], cache.inputs], axis=1)  # [B, k_u, d_in]
            y = y + jnp.einsum("bid,ido->bo", lagged, self.M_u[...], precision=HIGHEST)
        if cfg.k_y:
            y = y + jnp.einsum("bio,ioz->bz", cache.outputs, self.M_y[...], precision=HIGHEST)
        cache = LDSCache(
            state.hi,
            state.lo,
            _recent(x_t[:, None], cache.inputs),
            _recent(y[:, None], cache.outputs),
        )
        return cache, y.astype(cfg.dtype)


def _split(weights: np.ndarray, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    if dtype == jnp.float32:
        return tuple(lc.split_float64(weights))
    return jnp.asarray(weights, dtype), jnp.zeros(weights.shape, dtype)


def _recent(sequence: jax.Array, history: jax.Array) -> jax.Array:
    """The last ``history.shape[1]`` entries of ``history`` followed by ``sequence [B, T, D]``,
    most recent first."""
    keep = history.shape[1]
    if keep == 0:
        return history
    combined = jnp.concatenate([sequence[:, ::-1], history], axis=1)
    return combined[:, :keep]


def distill_model(
    model: nnx.Module, *, num_states: int = 120, arithmetic: str = "compensated"
) -> nnx.Module:
    """A copy of ``model`` in which every :class:`STU` is replaced by its :class:`LDSLayer`.

    Everything else (embeddings, norms, MLPs, attention layers, the input model) is unchanged;
    STUs with the same ``(max_len, num_filters, variant)`` share one fitted bank.
    """
    distilled = nnx.clone(model)
    targets = [
        (parent, key, child)
        for _, parent in nnx.iter_modules(distilled)
        for key, child in nnx.iter_children(parent)
        if isinstance(child, STU)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no STU layer to distill")
    banks: dict[tuple[int, int, str], LDSBank] = {}
    for parent, key, stu in targets:
        cfg = stu.config
        spec = (cfg.max_len, cfg.num_filters, cfg.variant)
        if spec not in banks:
            banks[spec] = fit_lds_bank(*spec, num_states, arithmetic=arithmetic)[0]
        setattr(parent, str(key), LDSLayer.from_stu(stu, banks[spec], arithmetic=arithmetic))
    return distilled
