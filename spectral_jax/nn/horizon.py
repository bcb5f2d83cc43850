"""Bounded memory horizons: a mixer that, past its training length ``L``, only ever computes what
it computed in training.

An STU has filters of ``L`` taps and stops at ``L``; a distilled LDS runs forever, but its
impulse response does not vanish at ``t = L`` (the bank's tail), so past ``L`` it answers inputs
older than any it saw in training. :class:`HorizonMixer` wraps either (any mixer that is linear
and time-invariant in its input within its window, with a zero initial state) and bounds what
each output sees. Policies (:func:`parse_horizon`):

* ``"none"``: the inner layer as it is (no wrapper is built);
* ``"restart:R"`` (staggered restarts, ``R >= 2``, ``L % R == 0``): ``R`` copies of the inner
  cache; copy ``r`` is reset to the empty cache whenever the position ``t`` has
  ``t % L == r * L / R``. Output ``t`` is read from copy ``(t // P + 1) % R`` (``P = L / R``),
  the copy with the largest age below ``L``: it restarted at
  ``s(t) = max(0, (t // P - R + 1) * P)``, so ``y_t = inner(x[s(t) : t + 1])[-1]``, an output the
  inner layer computes inside one training window, exactly, with a window of
  ``[L - P, L)`` past positions once ``t >= L`` (``[0, L)`` before: the first window is the
  unbounded layer's). Cost: ``R`` inner steps per token and ``R`` inner caches;
* ``"cutoff"`` (exact cutoff, distilled LDS layers only): :class:`CutoffMixer`, the layer's
  output minus its response to inputs older than ``L``.

Positions are counted from the cache's start, left padding included: a left-padded row of a
ragged batch restarts at the same positions as the others (its windows are still training
windows). The wrappers have no length limit: an STU wrapped in :class:`HorizonMixer` streams
(its copies never hold more than ``L`` positions). A whole model's mixers are wrapped by
:class:`~spectral_jax.nn.model.ModelConfig`'s ``horizon`` field, or afterwards by
:func:`set_horizon`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from spectral_jax.distill.fit import NO_TAIL, TailOptions
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU

HORIZON_SYNTAX = (
    "'none', 'restart:R' (R >= 2 copies; the training length must divide by R) or 'cutoff' "
    "(distilled LDS layers only)"
)


@dataclasses.dataclass(frozen=True)
class Horizon:
    """A parsed horizon policy: ``kind`` ``"none"``, ``"restart"`` or ``"cutoff"``; ``copies``:
    ``R``."""

    kind: str
    copies: int = 1

    def check_window(self, window: int, what: str) -> None:
        """Raise ValueError unless this policy can bound a layer of training length ``window``."""
        if self.kind == "restart" and window % self.copies:
            raise ValueError(
                f"horizon restart:{self.copies} needs a training length divisible by "
                f"{self.copies}, but {what} has {window}; choose R among the divisors of "
                f"{window}"
            )


def parse_horizon(policy: str) -> Horizon:
    """``"none"``, ``"restart:R"`` or ``"cutoff"`` -> :class:`Horizon`; anything else:
    ValueError naming the accepted syntax."""
    if not isinstance(policy, str):
        raise ValueError(f"horizon must be a string, {HORIZON_SYNTAX}; got {policy!r}")
    if policy in ("none", "cutoff"):
        return Horizon(policy)
    kind, _, count = policy.partition(":")
    if kind == "restart" and count.isdigit() and int(count) >= 2:
        return Horizon("restart", int(count))
    raise ValueError(f"horizon must be {HORIZON_SYNTAX}; got {policy!r}")


DISTILL_HORIZON_SYNTAX = (
    "'none', 'restart:R' (staggered restarts, R >= 2 dividing the training length), 'cutoff' "
    "(exact cutoff at L), "
    "'tail:W' (tail-penalised fit, weight W > 0 on zero targets in [L, 9L)) or 'cap:C' "
    "(eigenvalue cap: every decay has a^L <= C, 0 < C < 1)"
)


def parse_distill_horizon(spec: str) -> tuple[str, TailOptions]:
    """A distillation's horizon (``spectral-jax distill --horizon``) -> ``(wrapper policy for
    :func:`set_horizon`, the fit's :class:`~spectral_jax.distill.fit.TailOptions`)``: the
    restart policy wraps the distilled layers, ``tail:W`` / ``cap:C`` change the bank's fit."""
    kind, _, value = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind in ("none", "restart", "cutoff"):
        try:
            parse_horizon(spec)
        except ValueError:
            pass
        else:
            return spec, NO_TAIL
    elif kind in ("tail", "cap") and value:
        try:
            number = float(value)
            tail = TailOptions(weight=number) if kind == "tail" else TailOptions(cap=number)
        except ValueError:
            pass
        else:
            if tail.active:
                return "none", tail
    raise ValueError(f"the distillation horizon must be {DISTILL_HORIZON_SYNTAX}; got {spec!r}")


def inner_window(layer: nnx.Module) -> int:
    """The training length ``L`` of an STU or distilled LDS layer (its filters' length)."""
    config = layer.config
    stu = getattr(config, "stu", config)  # an LDSConfig holds its STU's config
    return int(stu.max_len)


@struct.dataclass
class HorizonCache:
    """Decode state of a :class:`HorizonMixer`.

    copies: the ``R`` inner caches stacked on a leading axis ``[R, ...]``.
    pos: int32 scalar, the next position. batch / dtype / options: how an empty inner cache
    is built when a copy restarts (static).
    """

    copies: Any
    pos: jax.Array
    batch: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    options: DecodeOptions = struct.field(pytree_node=False)


def _stack(caches: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)


class HorizonMixer(nnx.Module):
    """``inner`` (STU or distilled LDS layer, ``[B, T, d_in] -> [B, T, d_out]``) under the
    restart policy of the module docstring; any ``T``, no length limit."""

    def __init__(self, inner: nnx.Module, policy: str):
        horizon = parse_horizon(policy)
        if horizon.kind != "restart":
            raise ValueError(f"HorizonMixer runs restart:R policies, got {policy!r} (see wrap)")
        self.window = inner_window(inner)
        horizon.check_window(self.window, type(inner).__name__)
        self.policy = policy
        self.copies = horizon.copies
        self.inner = inner

    @property
    def length_limit(self) -> None:
        """None: every copy holds at most ``L`` positions, so the wrapper runs any length."""
        return None

    @property
    def block(self) -> int:
        """``P = L / R``: positions between two restarts of different copies."""
        return self.window // self.copies

    def _windowed(self, x: jax.Array) -> jax.Array:
        """``y_t = inner(x[s(t) : t + 1])[-1]`` for every ``t`` of ``x: [B, T, d_in]`` -> ``[B, T,
        d_out]``: the windows of each block of ``P`` outputs (right-aligned, zero-padded on the
        left) run as one inner call over ``[B * blocks, min(L, T), d_in]``."""
        batch, length = x.shape[:2]
        P, R = self.block, self.copies
        blocks = -(-length // P)
        width = min(self.window, length)
        j = np.arange(blocks)
        ends = np.minimum((j + 1) * P, length)  # [blocks]
        starts = np.maximum(0, (j - R + 1) * P)
        idx = ends[:, None] - width + np.arange(width)[None, :]  # [blocks, width]
        valid = idx >= starts[:, None]
        windows = jnp.where(valid[None, :, :, None], x[:, np.clip(idx, 0, None)], 0)
        y = self.inner(windows.reshape(batch * blocks, width, x.shape[-1]))
        y = y.reshape(batch, blocks, width, y.shape[-1])
        t = np.arange(length)
        return y[:, t // P, t - ends[t // P] + width]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Parallel path ``x [B, T, d_in] -> [B, T, d_out]``, any ``T``: the inner layer's own
        for ``T <= L`` (the first window), the windowed outputs past it."""
        if x.ndim == 3 and x.shape[1] <= self.window:
            return self.inner(x)
        return self._windowed(x)

    def init_cache(
        self, batch: int, max_len: int, dtype: Any, options: DecodeOptions = DEFAULT_DECODE
    ) -> HorizonCache:
        """``R`` empty inner caches of ``L`` positions (``max_len`` does not matter: the state
        is constant in the stream length)."""
        del max_len
        empty = self.inner.init_cache(batch, self.window, dtype, options)
        return HorizonCache(
            _stack([empty] * self.copies),
            jnp.zeros((), jnp.int32),
            batch,
            jnp.dtype(dtype).name,
            options,
        )

    def step(self, cache: HorizonCache, x_t: jax.Array) -> tuple[HorizonCache, jax.Array]:
        """One token ``x_t [B, d_in]`` -> ``(cache, y_t [B, d_out])``: reset the copy whose turn
        it is, step all ``R`` copies, read the oldest one younger than ``L``."""
        if not isinstance(cache, HorizonCache):
            raise ValueError(f"HorizonMixer.step: cache must be a HorizonCache, got {cache!r}")
        t, P, R = cache.pos, self.block, self.copies
        empty = self.inner.init_cache(cache.batch, self.window, cache.dtype, cache.options)
        restart = (t % self.window) == jnp.arange(R) * P  # [R]

        def reset(e, c):
            return jnp.where(restart.reshape((R,) + (1,) * e.ndim), e[None], c)

        copies = jax.tree.map(reset, empty, cache.copies)
        copies, ys = jax.vmap(self.inner.step, in_axes=(0, None))(copies, x_t)  # ys [R, B, O]
        y = ys[(t // P + 1) % R]
        return cache.replace(copies=copies, pos=t + 1), y

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: HorizonCache | None = None,
    ) -> tuple[jax.Array, HorizonCache]:
        """``x [B, T, d_in]`` at positions ``pos .. pos + T - 1`` -> ``(y [B, T, d_out], cache)``.

        Without ``cache`` (``pos = 0``): the outputs are :meth:`__call__`'s, and each copy's
        cache is the inner prefill over its own last segment (from its last restart to
        ``T``). With one: the positions are stepped (a ``lax.scan`` of :meth:`step`), which is
        exact and what a chunked model prefill past its first chunk runs. ``pad`` needs no
        handling (the inner layer is causal and time-invariant and sees zeros there).
        """
        del pad
        if cache is not None:
            xs = jnp.swapaxes(x, 0, 1)
            cache, ys = jax.lax.scan(self.step, cache, xs)
            return jnp.swapaxes(ys, 0, 1), cache
        length, L, P = x.shape[1], self.window, self.block
        caches = []
        for r in range(self.copies):
            last = length - 1
            start = 0 if last < r * P else r * P + L * ((last - r * P) // L)
            caches.append(self.inner.prefill(x[:, start:], options)[1])
        cache = HorizonCache(
            _stack(caches),
            jnp.asarray(length, jnp.int32),
            x.shape[0],
            jnp.dtype(x.dtype).name,
            options,
        )
        return self(x), cache


def set_horizon(model: nnx.Module, policy: str) -> nnx.Module:
    """Wrap (or unwrap, for ``"none"``) every STU / distilled LDS mixer of ``model`` in place
    under ``policy`` and record it in ``model.config.horizon``; returns ``model``."""
    parse_horizon(policy)
    for block in model.blocks:
        mixer = block.mixer
        inner = mixer.inner if isinstance(mixer, HorizonMixer | CutoffMixer) else mixer
        if isinstance(inner, STU | LDSLayer):
            block.mixer = wrap(inner, policy)
    model.config = dataclasses.replace(model.config, horizon=policy)
    return model


def distill_under(model: nnx.Module, horizon: str, **options: Any) -> nnx.Module:
    """``model`` distilled (:func:`~spectral_jax.nn.distillation.distill_model`, ``options``
    its keywords) under the distillation ``horizon`` (:func:`parse_distill_horizon`): the bank
    fitted with the horizon's tail options, then every LDS layer under its policy."""
    policy, tail = parse_distill_horizon(horizon)
    return set_horizon(distill_model(model, tail=tail, **options).model, policy)


def wrap(inner: nnx.Module, policy: str) -> nnx.Module:
    """``inner`` under ``policy``: itself (``"none"``), a :class:`HorizonMixer`
    (``"restart:R"``) or a :class:`CutoffMixer` (``"cutoff"``, distilled LDS layers only)."""
    kind = parse_horizon(policy).kind
    if kind == "none":
        return inner
    return CutoffMixer(inner) if kind == "cutoff" else HorizonMixer(inner, policy)


@struct.dataclass
class CutoffCache:
    """Decode state of a :class:`CutoffMixer`: ``inner``, the layer's own cache; ``tail``, the
    state of the copy fed the inputs delayed by ``L``; ``ring: [L, B, d_in]``, the last ``L``
    inputs (step ``t`` writes position ``t`` into slot ``t % L``); ``due: [B, d_in]``, the
    input ``x_{t - L}`` step ``t`` feeds the delayed copy (zero for ``t < L``), read from the
    ring by the step before; ``pos``."""

    inner: Any
    tail: Any
    ring: jax.Array
    due: jax.Array
    pos: jax.Array


class CutoffMixer(nnx.Module):
    """The exact cutoff of a distilled LDS layer (plain arithmetic, no output AR lags, no
    biases): ``y_t = sum_{j < L} C A^j B x_{t-j}`` (plus the layer's input AR terms), the
    layer's output minus its response to the inputs older than ``L``.

    A second copy of the state is fed the input delayed by ``L`` (a ring buffer of the last
    ``L`` inputs); its state ``s2_t`` equals the layer's state at ``t - L``, so
    ``C A^L s2_t`` is exactly the part of ``y_t`` that inputs older than ``L`` contribute (the
    layer is linear and time-invariant; exact up to float32 round-off), and is subtracted.
    Cost per token: two state updates and two readouts; state: two LDS states and ``L`` inputs
    (like a sliding window of ``L``). ``prefill`` and the parallel path past ``L`` step the
    positions (a ``lax.scan``).
    """

    def __init__(self, inner: nnx.Module):
        if not isinstance(inner, LDSLayer):
            raise ValueError(
                f"the cutoff horizon needs a distilled LDS layer, got {type(inner).__name__}: an "
                "STU has no response past L to cut (use restart:R to stream it)"
            )
        config = inner.config
        if config.arithmetic != "plain" or config.stu.k_y:
            raise ValueError(
                "the cutoff horizon is exact for plain-arithmetic LDS layers without output AR "
                f"lags, got arithmetic={config.arithmetic!r}, k_y={config.stu.k_y}; use "
                "restart:R"
            )
        self.window = inner_window(inner)
        self.policy = "cutoff"
        self.inner = inner

    @property
    def length_limit(self) -> None:
        return None

    def _tail_readout(self, state: Any) -> jax.Array:
        """``C A^L state``: ``[B, ...state] -> [B, d_out]``."""
        system = self.inner._system()
        return system.read(system.advance(jnp.asarray(self.window), state))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, d_in] -> [B, T, d_out]``: the layer's own within the first window."""
        if x.ndim == 3 and x.shape[1] <= self.window:
            return self.inner(x)
        return self.prefill(x)[0]

    def init_cache(
        self, batch: int, max_len: int, dtype: Any, options: DecodeOptions = DEFAULT_DECODE
    ) -> CutoffCache:
        """The layer's empty cache, an empty delayed copy and ``L`` zero inputs."""
        del max_len
        inner = self.inner.init_cache(batch, self.window, dtype, options)
        pdt = jnp.dtype(self.inner.config.stu.param_dtype)
        ring = jnp.zeros((self.window, batch, self.inner.config.stu.d_in), pdt)
        return CutoffCache(inner, inner.state, ring, ring[0], jnp.zeros((), jnp.int32))

    def step(self, cache: CutoffCache, x_t: jax.Array) -> tuple[CutoffCache, jax.Array]:
        """One token ``x_t [B, d_in]`` -> ``(cache, y_t [B, d_out])``."""
        if not isinstance(cache, CutoffCache):
            raise ValueError(f"CutoffMixer.step: cache must be a CutoffCache, got {cache!r}")
        inner, y = self.inner.step(cache.inner, x_t)
        tail, _ = self.inner._system().step(cache.tail, cache.due)
        y = y - self._tail_readout(tail).astype(y.dtype)
        # The ring is read only after this step's write, at the slot of x_{t + 1 - L}: a read
        # of the slot before the write made XLA copy the whole ring every step
        write = cache.pos % self.window
        ring = cache.ring.at[write].set(x_t.astype(cache.ring.dtype))
        due = ring[(cache.pos + 1) % self.window]
        return CutoffCache(inner, tail, ring, due, cache.pos + 1), y

    def prefill(
        self,
        x: jax.Array,
        options: DecodeOptions = DEFAULT_DECODE,
        pad: jax.Array | None = None,
        cache: CutoffCache | None = None,
    ) -> tuple[jax.Array, CutoffCache]:
        """``x [B, T, d_in]`` -> ``(y [B, T, d_out], cache)``, every position stepped from
        ``cache`` (None: empty). ``pad`` needs no handling (zeros there, as for the layer)."""
        del pad
        if cache is None:
            cache = self.init_cache(x.shape[0], self.window, x.dtype, options)
        cache, ys = jax.lax.scan(self.step, cache, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), cache
