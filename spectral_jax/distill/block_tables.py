"""Host-side float64 tables of reduced layers: decay powers over long lengths in bounded chunks,
and the block tables (decay fields, readout, impulse responses) that a reduced
:class:`~spectral_jax.nn.lds_layer.LDSLayer` stores for each channel group.

Blocks and groups come from :mod:`spectral_jax.distill.reduce` (:func:`pack_blocks`,
:func:`channel_groups`).
"""

from __future__ import annotations

import numpy as np

# Positions per chunk of decay powers (bounds the host arrays of long kernels: ``[chunk, k]``).
POWER_CHUNK = 1024


def exp_powers(decays: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``decays^t`` for integers ``t [n] >= 0``: ``[k] -> [n, k]``, as ``exp(t log decay)`` (a
    decay of 0 gives ``0^0 = 1``, then 0). Real decays give real powers with exact signs;
    complex ones complex powers (phase error ``~t eps |arg decay|``)."""
    t = np.asarray(t)[:, None]
    safe = np.where(decays == 0, 1.0, decays)
    if np.isrealobj(decays):
        sign = np.where((t % 2 == 1) & (safe < 0), -1.0, 1.0)
        powers = sign * np.exp(t * np.log(np.abs(safe)))
    else:
        powers = np.exp(t * np.log(safe.astype(complex)))
    return np.where(decays == 0, (t == 0).astype(float), powers)


def power_chunks(decays: np.ndarray, length: int):
    """``(start, decays^t for t in [start, start + n))`` ``[n, k]`` over ``[0, length)`` in
    chunks of :data:`POWER_CHUNK`: ``z^(start + j) = z^start z^j``, the factors from
    :func:`exp_powers` (a product per entry instead of a complex exponential; a few eps)."""
    within = exp_powers(decays, np.arange(min(POWER_CHUNK, length)))
    for start in range(0, length, POWER_CHUNK):
        n = min(POWER_CHUNK, length - start)
        yield start, exp_powers(decays, np.array([start])) * within[:n]


def decay_powers(decays: np.ndarray, length: int) -> np.ndarray:
    """``decays^t`` for ``t < length``: ``[k] -> [length, k]`` (:func:`exp_powers`)."""
    return np.concatenate([powers for _, powers in power_chunks(decays, length)])


# log|decay| stored for a padded slot (decay 0): its powers underflow to exactly 0
PAD_LOG_ABS = -1e4


def _fields(decays: np.ndarray) -> np.ndarray:
    """``[5, ...]`` real part, imaginary part, ``log|decay|``, ``phi`` and ``sign`` of complex
    ``decays [...]`` (``decay = sign |decay| exp(i phi)``, ``|phi| <= pi / 2``)."""
    modulus = np.abs(decays)
    if np.any(modulus >= 1):
        raise ValueError("reduced decays must lie inside the unit circle for a stable LDS")
    log_abs = np.where(modulus > 0, np.log(np.where(modulus > 0, modulus, 1.0)), PAD_LOG_ABS)
    # the powers' phase error is ~n eps |phi|, and a negative real decay has phi = 0 exactly
    sign = np.where(decays.real < 0, -1.0, 1.0)
    return np.stack([decays.real, decays.imag, log_abs, np.angle(sign * decays), sign])


def block_tables(mu: np.ndarray, weights: np.ndarray, length: int) -> tuple:
    """Host-side float64 arrays of a reduced layer from its blocks ``mu [C, P, 2]`` (complex)
    and ``weights [C, P, 2]`` (:func:`~spectral_jax.distill.reduce.pack_blocks`):
    ``(table [11, P, C]`` of ``mu1``'s and ``mu2``'s five fields (:func:`_fields`) and ``e``,
    ``readout [2, P, C]`` of ``wx, wy``, ``kernels [length, C])``. ``log|mu|`` and the
    argument come from float64, so the float32 powers of the prefill are accurate to
    ``~eps (1 + t |log mu|)`` also for ``|mu|`` near 1."""
    mu = np.moveaxis(np.asarray(mu, np.complex128), 0, 1)  # [P, C, 2]
    weights = np.moveaxis(np.asarray(weights, np.float64), 0, 1)
    e = (mu[..., 0].imag == 0).astype(np.float64)
    table = np.concatenate([_fields(mu[..., 0]), _fields(mu[..., 1]), e[None]])
    P, C = e.shape
    kernels = np.empty((length, C))
    chunks = zip(*(power_chunks(mu[..., i].reshape(-1), length) for i in (0, 1)), strict=True)
    for (start, p1), (_, p2) in chunks:
        p1, p2 = p1.reshape(-1, P, C), p2.reshape(-1, P, C)
        # h[t] = sum_P wx (Re mu1^t - e Im mu1^t) + wy (Im mu1^t + e Re mu2^t); Im mu1^t = 0
        # where e = 1 (mu1 real), so the x row is Re mu1^t alone
        terms = weights[..., 0] * p1.real + weights[..., 1] * (p1.imag + e * p2.real)
        kernels[start : start + p1.shape[0]] = terms.sum(axis=1)
    return table, np.moveaxis(weights, -1, 0), kernels


def group_tables(mu: np.ndarray, weights: np.ndarray, groups, length: int) -> tuple:
    """:func:`block_tables` of every channel group
    (:func:`~spectral_jax.distill.reduce.channel_groups`) of padded blocks
    ``mu, weights [C, slots, 2]``, flattened and concatenated in group order:
    ``(table [11, S], readout [2, S], kernels [length, C])``, ``S = sum_g P_g C_g``."""
    tables, readouts = [], []
    kernels = np.zeros((length, np.shape(mu)[0]))
    for channels, slots in groups:
        index = np.asarray(channels)
        table, readout, kernel = block_tables(mu[index, :slots], weights[index, :slots], length)
        tables.append(table.reshape(table.shape[0], -1))
        readouts.append(readout.reshape(2, -1))
        kernels[:, index] = kernel
    return np.concatenate(tables, axis=1), np.concatenate(readouts, axis=1), kernels
