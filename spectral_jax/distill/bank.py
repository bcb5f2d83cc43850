"""A fitted LDS bank (:class:`LDSBank`) and its pickle-free files.

A bank holds the decays ``a_j`` and coefficients ``W`` of one SpectraLDS fit
(:mod:`spectral_jax.distill.fit`): ``phi_k[t] ~= sum_j W[j, k] a_j^t``. Banks are saved as ``.npz``
with a JSON metadata string and never unpickled.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.ops import lds
from spectral_jax.ops.disk_cache import load_npz, save_npz_atomic
from spectral_jax.validation import VARIANTS, Variant, one_of, positive_int


@dataclasses.dataclass(frozen=True, eq=False)
class LDSBank:
    """A fitted bank: ``filters[:, k] ~= sum_j coeffs[j, k] decays[j]^t`` (plus branch).

    Attributes:
      decays: ``[n]`` float64 decays of one branch, each exactly representable in float32
        (standard: positive; Hankel-L: ``[a, -a]``).
      coeffs: ``[n, K]`` float64 output matrix.
      seq_len: the filter length ``L`` the bank was fitted to.
      variant: ``"standard"`` (two branches: decays and their negatives) or ``"hankel_l"``.
      metadata: JSON-serialisable fit settings and report.
    """

    decays: np.ndarray
    coeffs: np.ndarray
    seq_len: int
    variant: Variant
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        decays = np.asarray(self.decays, np.float64)
        coeffs = np.asarray(self.coeffs, np.float64)
        one_of("LDSBank", "variant", self.variant, VARIANTS)
        if decays.ndim != 1 or coeffs.ndim != 2 or coeffs.shape[0] != decays.size:
            raise ValueError(
                f"LDSBank needs decays [n] and coeffs [n, K]; got {decays.shape}, {coeffs.shape}"
            )
        lds.check_decays(decays)
        if not np.all(np.isfinite(coeffs)):
            raise ValueError("LDSBank.coeffs contain NaN or infinite values")
        if np.any(decays.astype(np.float32).astype(np.float64) != decays):
            raise ValueError("LDSBank.decays must be exactly representable in float32")
        positive_int("LDSBank", "seq_len", self.seq_len, minimum=2)
        object.__setattr__(self, "decays", decays)
        object.__setattr__(self, "coeffs", coeffs)

    @property
    def num_filters(self) -> int:
        return self.coeffs.shape[1]

    @property
    def num_branches(self) -> int:
        return 2 if self.variant == "standard" else 1

    @property
    def num_states(self) -> int:
        """States per input channel, both signs counted."""
        return self.decays.size * self.num_branches

    def branch_decays(self) -> np.ndarray:
        """``[S, n]`` decays per branch: ``[a, -a]`` rows for standard, ``[a]`` for Hankel-L."""
        if self.num_branches == 2:
            return np.stack([self.decays, -self.decays])
        return self.decays[None]

    def responses(self, length: int | None = None) -> np.ndarray:
        """Impulse responses ``a^t`` of every state, ``[length, S, n]`` in float64."""
        length = self.seq_len if length is None else length
        with jax.enable_x64(True):
            return np.asarray(lds.impulse_response(jnp.asarray(self.branch_decays()), length))

    def filters(self, length: int | None = None) -> np.ndarray:
        """The bank's filters ``[length, S * K]`` in float64 (plus branch, then minus branch)."""
        out = np.einsum("tsn,nk->tsk", self.responses(length), self.coeffs)
        return out.reshape(out.shape[0], -1)

    def tail_report(self, multiple: int = 16) -> dict[str, float]:
        """How much the bank answers past its training length ``L``, in float64:
        ``tail_energy_ratio`` = ``||filters[L : multiple * L]||^2 / ||filters[:L]||^2`` and
        ``in_window_error`` = ``||filters[:L] - exact||_F / ||exact||_F`` (the exact spectral
        filters, both branches)."""
        from spectral_jax.distill.fit import target_filters  # fit builds banks: import late

        positive_int("LDSBank.tail_report", "multiple", multiple, minimum=2)
        L = self.seq_len
        filters = self.filters(multiple * L)
        exact = target_filters(L, self.num_filters, self.variant)
        inside = np.sum(filters[:L] ** 2)
        return {
            "tail_energy_ratio": float(np.sum(filters[L:] ** 2) / inside),
            "in_window_error": float(np.linalg.norm(filters[:L] - exact) / np.linalg.norm(exact)),
        }


def bank_from_arrays(arrays: dict[str, np.ndarray], seq_len: int, variant: str) -> LDSBank:
    """The bank stored as ``arrays`` (``decays``, ``coeffs``, ``metadata``: a JSON string)."""
    missing = {"decays", "coeffs", "metadata"} - set(arrays)
    if missing:
        raise ValueError(f"not an LDS bank: missing {sorted(missing)}")
    metadata = json.loads(str(arrays["metadata"]))
    return LDSBank(
        np.array(arrays["decays"]), np.array(arrays["coeffs"]), seq_len, variant, metadata
    )


def save_bank(path: str | Path, bank: LDSBank) -> None:
    """Write ``bank`` to a pickle-free ``.npz`` file (arrays + a JSON metadata string)."""
    metadata = {**bank.metadata, "seq_len": bank.seq_len, "variant": bank.variant}
    save_npz_atomic(
        Path(path),
        {
            "decays": bank.decays,
            "coeffs": bank.coeffs,
            "metadata": np.asarray(json.dumps(metadata)),
        },
    )


def load_bank(path: str | Path) -> LDSBank:
    """Read a bank written by :func:`save_bank` (never unpickles anything)."""
    arrays = load_npz(Path(path))
    if "metadata" not in arrays:
        raise ValueError(f"{path} is not an LDS bank file: missing ['metadata']")
    metadata = json.loads(str(arrays["metadata"]))
    return bank_from_arrays(arrays, int(metadata["seq_len"]), str(metadata["variant"]))
