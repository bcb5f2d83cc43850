"""Convert a trained STU's parameters to those of its distilled LDS layer."""

from typing import Any

import numpy as np

from spectral_jax.distill.bank import LDSBank
from spectral_jax.ops.projection import PROJECTIONS_BY_NAME
from spectral_jax.validation import PROJECTIONS, Projection, one_of


def stu_to_lds(
    params: dict[str, Any], bank: LDSBank, projection: Projection
) -> dict[str, np.ndarray]:
    """Convert STU parameters (names as in :mod:`spectral_jax.ops.stu_ops`) to LDS-layer parameters.

    ``projection`` (the STU's ``"full"`` or ``"tensordot"``) says how
    (:meth:`~spectral_jax.ops.projection.FullProjection.lds_from_stu`): full mode keeps
    ``M_plus`` (and ``M_minus``); tensordot mode keeps ``M_in`` and folds each channel's filter
    mixture into the bank, a float64 ``readout [d_out, S, n]``. AR terms ``M_u``/``M_y`` are
    carried over unchanged.
    """
    one_of("stu_to_lds", "projection", projection, PROJECTIONS)
    rule = PROJECTIONS_BY_NAME[projection]
    two_branch = bank.num_branches == 2
    required = rule.stu_names(two_branch)
    unexpected = {"M_minus", "M_filt_minus"} & set(params) if not two_branch else set()
    missing = [name for name in required if name not in params]
    if missing or unexpected:
        raise ValueError(
            f"STU parameters do not match a {bank.variant} bank in {projection} mode: "
            f"missing {missing}, unexpected {sorted(unexpected)}"
        )
    arrays = {name: np.asarray(value) for name, value in params.items()}
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"STU parameter {name} contains NaN or infinite values")
    out = {name: arrays[name] for name in ("M_u", "M_y") if name in arrays}
    return {**out, **rule.lds_from_stu(arrays, bank.coeffs)}
