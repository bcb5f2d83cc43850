"""Flash STU's filters (a dense ``eigh``) and their alignment with ours: column order, signs and
the filter mixtures' rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from spectral_jax.ops.filters import hankel_matrix

FLOAT32_FILTER_TOLERANCE = 1e-6
"""Filter differences (relative to the largest entry) above float32 storage and ``eigh``
round-off: the report names such filters."""


def flashstu_filters(seq_len: int, num_filters: int, hankel_l: bool) -> np.ndarray:
    """The filters Flash STU computes itself ``[seq_len, K]`` (float64): NumPy's dense ``eigh``
    of the Hankel matrix, its top ``K`` eigenvectors in ascending eigenvalue order with LAPACK's
    signs, each times ``sigma^(1/4)``. ``O(seq_len^3)`` time, ``O(seq_len^2)`` memory."""
    sigma, phi = np.linalg.eigh(hankel_matrix(seq_len, "hankel_l" if hankel_l else "standard"))
    return phi[:, -num_filters:] * sigma[-num_filters:] ** 0.25


@dataclasses.dataclass(frozen=True)
class FilterAlignment:
    """``reference[:, j] ~= signs[j] * filters[:, order[j]]``; ``diffs[j]``: the largest
    ``|difference|`` of column ``j``, relative to the largest ``|filters|`` entry."""

    order: np.ndarray
    signs: np.ndarray
    diffs: np.ndarray

    def to_ours(self, rows: np.ndarray) -> np.ndarray:
        """Mixture rows ``[K, ...]`` in the reference's basis -> in the filters' basis."""
        out = np.empty_like(rows)
        out[self.order] = rows * self.signs.reshape(-1, *([1] * (rows.ndim - 1)))
        return out

    def to_reference(self, rows: np.ndarray) -> np.ndarray:
        """Mixture rows ``[K, ...]`` in the filters' basis -> in the reference's basis."""
        return rows[self.order] * self.signs.reshape(-1, *([1] * (rows.ndim - 1)))


def align_filters(reference: np.ndarray, filters: np.ndarray) -> FilterAlignment:
    """Match each column of ``reference [L, K]`` to the column of ``filters [L, K]`` it is up to
    sign (largest ``|cosine|``); ``ValueError`` unless that is one-to-one with every
    ``|cosine| > 0.9``, i.e. unless both hold the same filters."""
    ref, ours = np.asarray(reference, np.float64), np.asarray(filters, np.float64)
    if ref.shape != ours.shape:
        raise ValueError(f"phi has shape {ref.shape}, expected {ours.shape} [seq_len, num_eigh]")
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=0), 1e-300)  # noqa: E731
    cosine = unit(ours).T @ unit(ref)  # [K ours, K reference]
    order = np.argmax(np.abs(cosine), axis=0)
    best = np.abs(cosine[order, np.arange(ref.shape[1])])
    if len(set(order.tolist())) != ref.shape[1] or best.min() <= 0.9:
        raise ValueError(
            f"phi does not hold the spectral filters of this Hankel matrix (the best match of "
            f"filter {int(np.argmin(best))} has |cosine| {best.min():.3f}): load with "
            "keep_phi=True to use the checkpoint's own filters"
        )
    signs = np.sign(cosine[order, np.arange(ref.shape[1])])
    diffs = np.max(np.abs(ref - signs * ours[:, order]), axis=0) / np.abs(ours).max()
    return FilterAlignment(order, signs, diffs)
