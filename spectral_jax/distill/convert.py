"""Convert a trained STU's parameters to those of its distilled LDS layer."""

from typing import Any

import numpy as np

from spectral_jax.distill.bank import LDSBank


def stu_to_lds(params: dict[str, Any], bank: LDSBank, *, tensordot: bool) -> dict[str, np.ndarray]:
    """Convert STU parameters (names as in :mod:`spectral_jax.ops.stu_ops`) to LDS-layer parameters.

    Full mode keeps ``M_plus`` (and ``M_minus``): the LDS replaces only the convolutions, and its
    readout is the bank's ``coeffs``. Tensordot mode keeps ``M_in`` and folds each channel's
    filter mixture into the bank: ``readout[o, s, j] = sum_k coeffs[j, k] M_filt_s[k, o]``
    (float64, ``[d_out, S, n]``). AR terms ``M_u``/``M_y`` are carried over unchanged.
    """
    two_branch = bank.num_branches == 2
    branch_names = ("plus", "minus") if two_branch else ("plus",)
    if tensordot:
        required = ["M_in"] + [f"M_filt_{b}" for b in branch_names]
    else:
        required = [f"M_{b}" for b in branch_names]
    unexpected = {"M_minus", "M_filt_minus"} & set(params) if not two_branch else set()
    missing = [name for name in required if name not in params]
    if missing or unexpected:
        raise ValueError(
            f"STU parameters do not match a {bank.variant} bank in "
            f"{'tensordot' if tensordot else 'full'} mode: missing {missing}, "
            f"unexpected {sorted(unexpected)}"
        )
    arrays = {name: np.asarray(value) for name, value in params.items()}
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"STU parameter {name} contains NaN or infinite values")
    K = bank.num_filters
    out = {name: arrays[name] for name in ("M_u", "M_y") if name in arrays}
    if not tensordot:
        for name in required:
            if arrays[name].ndim != 3 or arrays[name].shape[0] != K:
                raise ValueError(f"{name} must be [K={K}, d_in, d_out], got {arrays[name].shape}")
            out[name] = arrays[name]
        return out
    mixes = [arrays[f"M_filt_{b}"] for b in branch_names]
    for b, mix in zip(branch_names, mixes, strict=True):
        if mix.ndim != 2 or mix.shape[0] != K:
            raise ValueError(f"M_filt_{b} must be [K={K}, d_out], got {mix.shape}")
    out["M_in"] = arrays["M_in"]
    readout = [bank.coeffs @ mix.astype(np.float64) for mix in mixes]  # S x [n, d_out]
    out["readout"] = np.stack(readout).transpose(2, 0, 1)
    return out
