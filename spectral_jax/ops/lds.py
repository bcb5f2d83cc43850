"""Diagonal linear dynamical systems (LDS) with real decays, as pure functions.

Every state channel ``i`` evolves independently:

    x_t[i] = a[i] * x_{t-1}[i] + u_t[i],      x_{-1} = x0 (zeros by default),

so ``x_t = a^(t+1) x0 + sum_{s<=t} a^(t-s) u_s``: a causal convolution of ``u`` with the impulse
response ``a^t``. Decays are real and lie in the open interval (-1, 1).

Shapes: ``decays: [*S]`` (any channel shape, e.g. ``[D, N]``), ``u: [B, L, *S]``, states
``[B, L, *S]``, ``x0`` and single-step states ``[B, *S]``. Shapes must match exactly; nothing is
broadcast silently. Inputs must be float32 or float64, and the decays must already have the
input's dtype (casting float64 decays to float32 would silently change the system).

Accuracy: the parallel scan carries *segment lengths* and evaluates ``a^n`` as
``sign^n exp(n log|a|)``, whose relative error is ``~eps (1 + n |log a|)``. The textbook combine
``(a1 a2, a2 b1 + b2)`` instead builds ``a^n`` by repeated squaring, whose error grows like
``n eps``: for a slow float32 decay (``1 - a = 1e-4``) at ``n = 4096`` that is 2e-4, as large an
error as using a wrong decay. Values of the decays are checked wherever they are concrete
(outside ``jit``); under ``jit`` only shapes and dtypes can be checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.validation import STATE_DTYPES, float_dtype, positive_int

HIGHEST = jax.lax.Precision.HIGHEST
# Prompt positions per matmul of :func:`driven_final_state` (bounds its decay-power table).
FINAL_STATE_CHUNK = 4096


def check_decays(decays) -> None:
    """Raise ``ValueError`` unless ``decays`` are finite reals in (-1, 1). Traced values (under
    ``jit``) cannot be inspected and are accepted."""
    if isinstance(decays, jax.core.Tracer):
        return
    values = np.asarray(decays)
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"decays must be real floating-point numbers, got dtype {values.dtype}")
    bad = ~(np.abs(values) < 1.0)  # also catches NaN
    if bad.any():
        example = values[bad].ravel()[0]
        raise ValueError(
            f"decays must lie in the open interval (-1, 1) for a stable LDS; {int(bad.sum())} "
            f"of {values.size} do not (e.g. {example!r})"
        )


def _check_dtype(name: str, x: jax.Array) -> None:
    float_dtype("", name, x.dtype, STATE_DTYPES)


def validate(decays, u: jax.Array, x0: jax.Array | None, time_axis: bool) -> jax.Array:
    """Shape/dtype validation shared by the scans (``time_axis``) and :func:`step`; returns the
    decays as a JAX array."""
    if not hasattr(decays, "dtype"):
        decays = np.asarray(decays)
    check_decays(decays)
    _check_dtype("u", u)
    lead = 2 if time_axis else 1
    what = "[B, L, *S]" if time_axis else "[B, *S]"
    if u.ndim != lead + decays.ndim or u.shape[lead:] != decays.shape:
        raise ValueError(
            f"input must have shape {what} with S = decays.shape = {decays.shape}, got {u.shape}"
        )
    if decays.dtype != u.dtype:
        raise ValueError(
            f"decays have dtype {decays.dtype} but the input has {u.dtype}; cast the decays "
            "explicitly (this rounds them, which changes the system)"
        )
    if x0 is not None:
        expected = (u.shape[0], *decays.shape)
        if x0.shape != expected or x0.dtype != u.dtype:
            raise ValueError(
                f"initial state must have shape {expected} and dtype {u.dtype}, "
                f"got {x0.shape} {x0.dtype}"
            )
    return jnp.asarray(decays)


def log_abs_decay(decays: jax.Array) -> jax.Array:
    """``log|a|`` accurate to a few ulps also for ``|a|`` near 1 (``|a| - 1`` is exact there)."""
    m = jnp.abs(decays)
    return jnp.where(m >= 0.5, jnp.log1p(m - 1), jnp.log(m))


def decay_powers(decays: jax.Array, n: jax.Array, log_abs: jax.Array | None = None) -> jax.Array:
    """``a^n`` for decays ``a: [*S]`` and integer exponents ``n >= 1`` broadcastable against
    ``a``, as ``sign^n exp(n log|a|)`` (relative error ``~eps (1 + n |log a|)``)."""
    if log_abs is None:
        log_abs = log_abs_decay(decays)
    p = jnp.exp(n.astype(decays.dtype) * log_abs)
    return jnp.where((decays < 0) & (n % 2 == 1), -p, p)


def powers(decays: jax.Array, n: jax.Array) -> jax.Array:
    """``a^n`` for integer ``n >= 0`` (``a^0 = 1``), otherwise as :func:`decay_powers`."""
    one = jnp.ones((), decays.dtype)
    return jnp.where(n == 0, one, decay_powers(decays, jnp.maximum(n, 1)))


def impulse_response(decays: jax.Array, length: int) -> jax.Array:
    """``h[t] = a^t`` for ``t < length``: ``decays: [*S] -> [length, *S]`` (``0^0 = 1``)."""
    if not hasattr(decays, "dtype"):
        decays = np.asarray(decays)
    check_decays(decays)
    _check_dtype("decays", decays)
    decays = jnp.asarray(decays)
    length = positive_int("", "length", length)
    t = jnp.arange(length).reshape((length,) + (1,) * decays.ndim)
    return powers(decays, t)


def driven_final_state(
    decays: jax.Array, drive: jax.Array, x0: jax.Array | None = None
) -> jax.Array:
    """The state after a prompt when every state of a channel is driven by that channel's input:
    ``x[b, c, *s] = a[*s]^T x0[b, c, *s] + sum_t a[*s]^(T-1-t) drive[b, t, c]`` (``x0`` zeros
    by default).

    Computed without any scan, as two matmuls against decay powers: within chunks of
    :data:`FINAL_STATE_CHUNK` positions, then across chunks (by ``a^chunk`` powers). Each power
    is formed directly (:func:`decay_powers`), and the sums have no cancellation (every term is
    a state's own contribution), so the float32 result is accurate to ~``sqrt(T) eps``, like a
    scan's.

    Args:
      decays: ``[*S]``, same dtype as ``drive``.
      drive: ``[B, T, C]``.
      x0: ``[B, C, *S]`` or None, the state before the prompt.
    Returns:
      ``[B, C, *S]``.
    """
    if not hasattr(decays, "dtype"):
        decays = np.asarray(decays)
    check_decays(decays)
    _check_dtype("drive", drive)
    if drive.ndim != 3:
        raise ValueError(f"drive must have shape [B, T, C], got {drive.shape}")
    if decays.dtype != drive.dtype:
        raise ValueError(f"decays have dtype {decays.dtype} but the drive has {drive.dtype}")
    decays = jnp.asarray(decays)
    state = _driven_final_state(decays, drive, min(FINAL_STATE_CHUNK, drive.shape[1]))
    if x0 is None:
        return state
    expected = (drive.shape[0], drive.shape[2], *decays.shape)
    if x0.shape != expected or x0.dtype != drive.dtype:
        raise ValueError(
            f"initial state must have shape {expected} and dtype {drive.dtype}, "
            f"got {x0.shape} {x0.dtype}"
        )
    return state + powers(decays, jnp.asarray(drive.shape[1])) * x0


@functools.partial(jax.jit, static_argnames="chunk")
def _driven_final_state(decays: jax.Array, drive: jax.Array, chunk: int) -> jax.Array:
    B, T, C = drive.shape
    flat = decays.reshape(-1)
    count = -(-T // chunk)
    # Zeros before the prompt leave the final state unchanged: pad to whole chunks at the front.
    drive = jnp.pad(drive, ((0, 0), (count * chunk - T, 0), (0, 0))).reshape(B, count, chunk, C)
    within = powers(flat, jnp.arange(chunk - 1, -1, -1)[:, None])  # [chunk, N]
    local = jnp.einsum("bktc,tn->bkcn", drive, within, precision=HIGHEST)
    across = powers(flat, chunk * jnp.arange(count - 1, -1, -1)[:, None])  # [count, N]
    state = jnp.einsum("bkcn,kn->bcn", local, across, precision=HIGHEST)
    return state.reshape(B, C, *decays.shape)


def last_state(states):
    """The state after the last position of ``states [B, L, *S]``: ``[B, *S]`` (any pytree of
    such arrays, e.g. a compensated pair)."""
    return jax.tree.map(lambda s: s[:, -1], states)


def step(decays: jax.Array, x: jax.Array, u_t: jax.Array) -> jax.Array:
    """One time step ``x_t = a x_{t-1} + u_t``: ``x, u_t: [B, *S] -> [B, *S]``."""
    decays = validate(decays, u_t, x, time_axis=False)
    return _step(decays, x, u_t)


@jax.jit
def _step(decays: jax.Array, x: jax.Array, u_t: jax.Array) -> jax.Array:
    return decays * x + u_t


def _scan_args(decays, u: jax.Array, x0: jax.Array | None):
    """Validated ``(decays, u, x0)`` for the scans, with a zero initial state by default."""
    decays = validate(decays, u, x0, time_axis=True)
    if x0 is None:
        x0 = jnp.zeros((u.shape[0], *decays.shape), u.dtype)
    return decays, u, x0


def scan(decays: jax.Array, u: jax.Array, x0: jax.Array | None = None) -> jax.Array:
    """All states by a sequential ``lax.scan`` over time: ``u: [B, L, *S] -> [B, L, *S]``."""
    return _scan(*_scan_args(decays, u, x0))


@jax.jit
def _scan(decays: jax.Array, u: jax.Array, x0: jax.Array) -> jax.Array:
    def advance(x, u_t):
        x = decays * x + u_t
        return x, x

    _, states = jax.lax.scan(advance, x0, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(states, 0, 1)


def parallel_scan(decays: jax.Array, u: jax.Array, x0: jax.Array | None = None) -> jax.Array:
    """All states by ``lax.associative_scan`` (depth ``O(log L)``): ``u: [B, L, *S] -> [B, L, *S]``.

    The scanned elements are ``(n, b)``: a segment of ``n`` steps maps ``x`` to ``a^n x + b``;
    two segments compose as ``(n1 + n2, a^n2 b1 + b2)`` with ``a^n2`` from :func:`decay_powers`.
    """
    return _parallel_scan(*_scan_args(decays, u, x0))


@jax.jit
def _parallel_scan(decays: jax.Array, u: jax.Array, x0: jax.Array) -> jax.Array:
    u = u.at[:, 0].add(decays * x0)
    log_abs = log_abs_decay(decays)
    counts = jnp.ones((1, u.shape[1]) + (1,) * decays.ndim, jnp.int32)

    def combine(left, right):
        n1, b1 = left
        n2, b2 = right
        return n1 + n2, decay_powers(decays, n2, log_abs) * b1 + b2

    _, states = jax.lax.associative_scan(combine, (counts, u), axis=1)
    return states
