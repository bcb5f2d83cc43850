"""The math of a distilled STU layer: its diagonal LDS, driven, read out and run over prompts.

A :class:`DistilledLDS` bundles what that math needs (the layer holds the arrays; see
:class:`spectral_jax.nn.lds_layer.LDSLayer`): the projection's and the arithmetic's objects
(:mod:`spectral_jax.ops.projection`, :mod:`spectral_jax.ops.lds_arithmetic`), the decays, the
stored readout words, the prefill kernels and the spectral parameters. Its methods are pure
functions of those; no method branches on the projection or the arithmetic.

Shapes: layer inputs ``x [B, T, d_in]``, LDS inputs (drives) ``[..., C]``, states
``[..., C, S, n]`` in the arithmetic's state type, outputs before AR terms ``[..., d_out]``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds, lds_continuation
from spectral_jax.ops.lds_arithmetic import LDSArithmetic
from spectral_jax.ops.projection import STUProjection
from spectral_jax.validation import ScanKind

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledLDS:
    """One distilled layer's LDS.

    Attributes:
      projection, arithmetic: the layer's projection and arithmetic objects.
      decays: ``[S, n]``. readout: the arithmetic's stored words ``[words, ...]``.
      kernels: ``[max_len, F]`` impulse responses of the readout (formed in float64).
      params: the spectral parameters by name (``M_plus``/``M_minus`` or ``M_in``).
    """

    projection: STUProjection
    arithmetic: LDSArithmetic
    decays: jax.Array
    readout: jax.Array
    kernels: jax.Array
    params: Mapping[str, jax.Array]

    def drive(self, x: jax.Array) -> jax.Array:
        """LDS inputs ``[..., C]`` from layer inputs ``[..., d_in]``."""
        return self.projection.conv_input(self.params, x, HIGHEST)

    def expand(self, drive: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every state's input ``[..., C, S, n]`` and decays ``[C, S, n]``, from ``[..., C]``."""
        u = jnp.broadcast_to(drive[..., None, None], drive.shape + self.decays.shape)
        return u, jnp.broadcast_to(self.decays, (drive.shape[-1], *self.decays.shape))

    def read(self, states: Any) -> jax.Array:
        """Outputs before AR terms: ``states [..., C, S, n] -> [..., d_out]``."""
        weights = self.arithmetic.weights(self.readout)
        return self.projection.lds_read(self.arithmetic, states, weights, self.params)

    def convolve(self, x: jax.Array) -> jax.Array:
        """Outputs before AR terms by FFT with the kernels: ``x [B, T <= max_len, d_in]``."""
        return self.projection.convolve(self.drive(x), self.kernels[: x.shape[1]], self.params)

    def final_state(self, x: jax.Array, x0: Any = None) -> Any:
        """The state ``[B, C, S, n]`` after ``x [B, T, d_in]`` from ``x0`` (zeros if None)."""
        return self.arithmetic.final_state(self.decays, self.drive(x), x0)

    def advance(self, n: jax.Array, state: jax.Array) -> jax.Array:
        """A plain ``state [..., C, S, n]`` ``n`` steps on with zero inputs: ``a^n x``."""
        return lds.decay_powers(self.decays, n) * state

    def free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs before AR terms ``[B, length, d_out]`` of a plain ``state [B, C, S, n]`` with
        zero inputs: ``y[t] = sum_n w_n a_n^(t+1) x_n``."""
        weights = self.arithmetic.weights(self.readout)
        t = jnp.arange(1, length + 1).reshape(length, 1, 1)
        decay_powers = lds.decay_powers(self.decays, t)  # [T, S, n]
        return self.projection.free_response(decay_powers, state, weights, self.params)

    def scan(self, kind: str, x: jax.Array, x0: Any = None) -> Any:
        """Every state ``[B, T, C, S, n]`` of ``x [B, T, d_in]`` by the arithmetic's
        ``"parallel"`` or ``"sequential"`` scan from ``x0``."""
        u, decays = self.expand(self.drive(x))
        return self.arithmetic.scan(kind, decays, u, x0)

    def sequence(self, x: jax.Array, scan: ScanKind) -> tuple[jax.Array, Any]:
        """The one place the scan kind is chosen: ``x [B, T, d_in]`` -> (outputs before AR terms
        ``[B, T, d_out]``, state after position ``T - 1``).

        ``"fft"``: the kernels' length by FFT and the state by decay-power matmuls, then the
        rest in blocks (:func:`spectral_jax.ops.lds_continuation.continue_in_blocks`);
        ``"parallel"`` / ``"sequential"``: every state by a scan.
        """
        if scan != "fft":
            states = self.scan(scan, x)
            return self.read(states), lds.last_state(states)
        head = x[:, : self.kernels.shape[0]]
        y, state = self.convolve(head), self.final_state(head)
        if x.shape[1] == head.shape[1]:
            return y, state
        state, tail = lds_continuation.continue_in_blocks(self, x[:, head.shape[1] :], state)
        return jnp.concatenate([y, tail], axis=1), state

    def zeros(self, batch: int, channels: int) -> Any:
        """The empty state ``[batch, channels, S, n]`` in the arithmetic's state type."""
        return self.arithmetic.zeros((batch, channels, *self.decays.shape), self.decays.dtype)

    def step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
        """One position ``x_t [B, d_in]``: (the next state, outputs before AR terms
        ``[B, d_out]``). The drive ``[B, C]`` and the decays ``[S, n]`` broadcast inside the
        update (nothing of the state's size is formed besides it)."""
        state = self.arithmetic.drive_step(self.decays, state, self.drive(x_t))
        return state, self.read(state)


# Prompt positions per matmul of the reduced final state (bounds its power table
# ``[chunk, P, C]``).
SLOT_CHUNK = 512


def slot_powers(fields: jax.Array, n: jax.Array) -> jax.Array:
    """``decay^n`` (complex) for integer ``n >= 0`` broadcastable against the decays' five
    ``fields [5, ...]`` (:func:`spectral_jax.distill.block_tables.block_tables`), as
    ``sign^n exp(n log|decay|) (cos + i sin)(n phi)`` (phase error ``~n eps |phi|``,
    ``|phi| <= pi / 2``)."""
    odd = (n % 2 == 1) & (fields[4] < 0)
    n = n.astype(fields.dtype)
    magnitude = jnp.where(odd, -1.0, 1.0) * jnp.exp(n * fields[2])
    phase = n * fields[3]
    return jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))


def sum_blocks(term: Callable[[int], jax.Array], blocks: int) -> jax.Array:
    """``sum_p term(p)`` over ``blocks`` static block indices (each term ``[..., C]``), as a
    pairwise tree. XLA:CPU emits a reduction over a non-minor axis as a strided loop: measured
    on the 2-core CPU (``[B, P=18, C=128]`` float32 blocks), a step whose readout adds the
    blocks' slices is 3x (batch 1) to 2x (batch 64, 256) faster than one that reduces
    ``[B, P, C]`` over ``P``. Each term reads its own slice, so the adds fuse into one pass over
    the state (a product over the whole state, sliced after, would be materialised)."""
    parts = [term(p) for p in range(blocks)]
    while len(parts) > 1:
        parts = [sum(parts[i : i + 2]) for i in range(0, len(parts), 2)]
    return parts[0]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockGroup:
    """One channel group of a reduced layer, in real 2-state blocks
    (:func:`~spectral_jax.distill.reduce.pack_blocks`): block ``p`` of channel ``c`` holds
    ``(x, y)`` with ``x' = Re(mu1) x - Im(mu1) y + u[c]``, ``y' = Im(mu1) x + Re(mu2) y + e u[c]``,
    read as ``y[c] = sum_p wx x + wy y``. Its ``n``-step map is
    ``[[Re mu1^n, -Im mu1^n], [Im mu1^n, Re mu2^n]]`` (a rotation for a pair, a diagonal for two
    real decays).

    Attributes:
      table: ``[11, P, C]``: ``mu1``'s and ``mu2``'s five fields, then ``e``
        (:func:`~spectral_jax.distill.block_tables.block_tables`).
      weights: ``[2, P * C]`` (``wx, wy`` of ``[P, C]``, flattened as the layer stores them).

    A state is one complex array ``[..., P, C]`` (complex64 for float32 tables) that stores the
    blocks' real states ``x`` and ``y`` as its real and imaginary parts: the 2x2 block map is
    real, not a complex product, but one array lets XLA update both planes in one in-place
    pass (two real arrays take two fusions, and the decode loop copies each plane before the
    first one overwrites it). Channels are last, so every update runs along the batch's
    channels. Drives are ``[..., C]``.
    """

    table: jax.Array
    weights: jax.Array

    def _powers(self, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mu1^n, mu2^n)`` complex, ``n`` broadcastable against ``[P, C]``."""
        return slot_powers(self.table[0:5], n), slot_powers(self.table[5:10], n)

    def zeros(self, batch: int) -> jax.Array:
        plane = jnp.zeros((batch, *self.table.shape[1:]), self.table.dtype)
        return jax.lax.complex(plane, plane)

    def advance(self, n: jax.Array, state: jax.Array) -> jax.Array:
        """The blocks' ``n``-step map applied to ``state [..., P, C]``."""
        (x, y), (p1, p2) = (state.real, state.imag), self._powers(n)
        return jax.lax.complex(p1.real * x - p1.imag * y, p1.imag * x + p2.real * y)

    def read(self, state: jax.Array) -> jax.Array:
        """``state [..., P, C] -> [..., C]``: one pass over the state (:func:`sum_blocks`)."""
        w, C = self.weights.reshape(2, -1), state.shape[-1]

        def term(p):  # slices first: XLA then fuses each into the one pass (a reshaped weight
            # table would be copied every step)
            block, wp = state[..., p, :], w[:, p * C : (p + 1) * C]
            return block.real * wp[0] + block.imag * wp[1]

        return sum_blocks(term, state.shape[-2])

    def update(self, state: jax.Array, drive: jax.Array) -> jax.Array:
        """``state [B, P, C]`` after one position of ``drive [B, C]``: elementwise, in place."""
        (x, y), t, u = (state.real, state.imag), self.table, drive[:, None, :]
        u = u.astype(x.dtype)
        return jax.lax.complex(t[0] * x - t[1] * y + u, t[1] * x + t[5] * y + t[10] * u)

    def final_state(self, drive: jax.Array, x0: jax.Array | None) -> jax.Array:
        """The state ``[B, P, C]`` after ``drive [B, T, C]`` from ``x0`` (zeros if None), by
        matmuls against the decays' powers (within chunks of :data:`SLOT_CHUNK`, then across):
        ``x = Re S1``, ``y = Im S1 + e Re S2`` with ``S_i = sum_t mu_i^(T-1-t) u_t``."""
        B, T, C = drive.shape
        chunk = min(SLOT_CHUNK, T)
        count = -(-T // chunk)
        drive = jnp.pad(drive, ((0, 0), (count * chunk - T, 0), (0, 0)))
        drive = drive.reshape(B, count, chunk, C).astype(jnp.result_type(drive, jnp.complex64))
        within = self._powers(jnp.arange(chunk - 1, -1, -1)[:, None, None])
        across = self._powers(chunk * jnp.arange(count - 1, -1, -1)[:, None, None])
        s1, s2 = (
            jnp.einsum(
                "bkpc,kpc->bpc",
                jnp.einsum("bktc,tpc->bkpc", drive, w, precision=HIGHEST),
                a,
                precision=HIGHEST,
            )
            for w, a in zip(within, across, strict=True)
        )
        state = jax.lax.complex(s1.real, s1.imag + self.table[10] * s2.real)
        return state if x0 is None else state + self.advance(jnp.asarray(T), x0)

    def free_response(self, state: jax.Array, length: int) -> jax.Array:
        """Outputs ``[B, length, C]`` of ``state [B, P, C]`` with zero inputs:
        ``sum_p Re(mu1^t) wx x + Im(mu1^t) (wy x - wx y) + Re(mu2^t) wy y``."""
        (x, y), (wx, wy) = (state.real, state.imag), self.weights.reshape(2, *state.shape[-2:])
        p1, p2 = self._powers(jnp.arange(1, length + 1).reshape(length, 1, 1))
        terms = ((p1.real, wx * x), (p1.imag, wy * x - wx * y), (p2.real, wy * y))
        return sum(jnp.einsum("tpc,bpc->btc", p, s, precision=HIGHEST) for p, s in terms)

    def scan(self, kind: str, drive: jax.Array, x0: jax.Array) -> jax.Array:
        """Every state ``[B, T, P, C]`` of ``drive [T, B, C]`` (time first) from ``x0``, by a
        sequential ``lax.scan`` or an associative scan over (steps, state) segments."""
        if kind == "sequential":

            def advance(z, u):
                z = self.update(z, u)
                return z, z

            states = jax.lax.scan(advance, x0, drive)[1]
        else:
            u = jnp.broadcast_to(drive[..., None, :], (*drive.shape[:-1], *self.table.shape[1:]))
            u = jax.lax.complex(u, self.table[10] * u).astype(x0.dtype)
            u = u.at[0].add(self.advance(jnp.asarray(1), x0))
            counts = jnp.ones((drive.shape[0], 1, 1, 1), jnp.int32)

            def combine(left, right):
                return left[0] + right[0], self.advance(right[0], left[1]) + right[1]

            states = jax.lax.associative_scan(combine, (counts, u))[1]
        return jnp.swapaxes(states, 0, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ReducedLDS(DistilledLDS):
    """A tensordot layer's LDS reduced per channel (:mod:`spectral_jax.distill.reduce`), its
    channels in groups of :class:`BlockGroup` (each padded to its own block count). Plain
    arithmetic only.

    Attributes (beyond :class:`DistilledLDS`'s): ``decays`` is the groups' tables flattened
    and concatenated, ``[11, sum_g P_g C_g]``; ``readout`` their weights, ``[1, 2, sum_g P_g
    C_g]``; ``layout`` the groups ``((channels, P_g), ...)``
    (:func:`~spectral_jax.distill.reduce.channel_groups`). States are tuples of one complex
    array ``[B, P_g, C_g]`` per group (:class:`BlockGroup`).
    """

    layout: tuple[tuple[tuple[int, ...], int], ...] = ()

    def _groups(self) -> list[tuple[np.ndarray, BlockGroup]]:
        """``(channels [C_g], group)`` of every group, sliced from the flat arrays."""
        weights = self.arithmetic.weights(self.readout)
        groups, start = [], 0
        for channels, slots in self.layout:
            shape, stop = (slots, len(channels)), start + slots * len(channels)
            table = self.decays[:, start:stop].reshape(-1, *shape)
            groups.append((np.asarray(channels), BlockGroup(table, weights[:, start:stop])))
            start = stop
        return groups

    def _split(self, x: jax.Array) -> list[tuple[jax.Array, BlockGroup]]:
        """Each group's drive ``[..., C_g]`` from layer inputs ``x [..., d_in]``, with its group.

        The drive is computed with ``M_in``'s columns in group order, so each group's drive is
        a contiguous slice (the gather of weights is loop-invariant: XLA hoists it out of a
        decode loop, where a gather of the drive would cost one more pass per group and step).
        """
        groups = self._groups()
        if len(groups) == 1:
            return [(self.drive(x), groups[0][1])]
        order = np.concatenate([channels for channels, _ in groups])
        params = {**self.params, "M_in": self.params["M_in"][:, order]}
        drive = self.projection.conv_input(params, x, HIGHEST)
        bounds = np.cumsum([0, *(channels.size for channels, _ in groups)])
        return [
            (drive[..., start:stop], group)
            for (start, stop), (_, group) in zip(itertools.pairwise(bounds), groups, strict=True)
        ]

    def _merge(self, outputs: list[jax.Array]) -> jax.Array:
        """The groups' outputs ``[..., C_g]`` back in channel order ``[..., C]``."""
        if len(outputs) == 1:
            return outputs[0]
        order = np.argsort(np.concatenate([channels for channels, _ in self.layout]))
        return jnp.concatenate(outputs, axis=-1)[..., order]

    def advance(self, n: jax.Array, state: tuple) -> tuple:
        """Every group's ``n``-step map applied to its state ``[..., P_g, C_g]``."""
        return tuple(g.advance(n, s) for (_, g), s in zip(self._groups(), state, strict=True))

    def zeros(self, batch: int, channels: int) -> tuple:
        """The empty state: ``[batch, P_g, C_g]`` per group (``channels`` must be C)."""
        width = sum(len(ch) for ch, _ in self.layout)
        if channels != width:
            raise ValueError(f"this reduced LDS has {width} channels, not {channels}")
        return tuple(g.zeros(batch) for _, g in self._groups())

    def read(self, states: tuple) -> jax.Array:
        """``states`` (per group, ``[..., P_g, C_g]``) ``-> [..., C]``."""
        groups = self._groups()
        return self._merge([g.read(s) for (_, g), s in zip(groups, states, strict=True)])

    def final_state(self, x: jax.Array, x0: Any = None) -> tuple:
        """The state after ``x [B, T, d_in]`` from ``x0`` (zeros if None)."""
        parts = self._split(x)
        x0 = (None,) * len(parts) if x0 is None else x0
        return tuple(g.final_state(d, s) for (d, g), s in zip(parts, x0, strict=True))

    def free_response(self, state: tuple, length: int) -> jax.Array:
        """Outputs ``[B, length, C]`` of ``state`` with zero inputs."""
        groups = self._groups()
        return self._merge(
            [g.free_response(s, length) for (_, g), s in zip(groups, state, strict=True)]
        )

    def scan(self, kind: str, x: jax.Array, x0: Any = None) -> tuple:
        """Every state (per group, ``[B, T, P_g, C_g]``) of ``x [B, T, d_in]`` from
        ``x0``."""
        parts = [(jnp.swapaxes(d, 0, 1), g) for d, g in self._split(x)]  # [T, B, C_g]
        x0 = self.zeros(x.shape[0], sum(len(ch) for ch, _ in self.layout)) if x0 is None else x0
        return tuple(g.scan(kind, d, s) for (d, g), s in zip(parts, x0, strict=True))

    def step(self, state: tuple, x_t: jax.Array) -> tuple[tuple, jax.Array]:
        """One position: each group's update and readout in one pass over its state."""
        parts = self._split(x_t)
        state = tuple(g.update(s, d) for (d, g), s in zip(parts, state, strict=True))
        return state, self._merge([g.read(s) for (_, g), s in zip(parts, state, strict=True)])
