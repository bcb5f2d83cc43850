"""Distill a whole model: every STU layer becomes its :class:`~spectral_jax.nn.lds_layer.LDSLayer`.

This is the one function that distills a model and keeps the bank bookkeeping (one fit per
distinct ``(max_len, num_filters, variant)``, shared by every STU with that spec, and one report
per bank). It lives in ``nn/`` rather than in :mod:`spectral_jax.distill` because it walks an nnx
model and builds nnx layers: the pure fit (:mod:`spectral_jax.distill`) sits on the floor below
``nn`` and must not import it. Callers (CLI, demo, inference, experiments) import it from here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.fit import DEFAULT_NUM_STATES, fit_lds_bank
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.stu import STU
from spectral_jax.validation import ARITHMETICS, Arithmetic, one_of


class DistilledModel(NamedTuple):
    """A distilled copy of a model and the fit report of each bank it uses.

    model: the copy, with every STU replaced by an :class:`LDSLayer`.
    banks: one dict per distinct bank, ``{"L", "K", "variant", "layers"}`` (``layers``: how many
      STUs use it) plus the fit report of :func:`spectral_jax.distill.fit.fit_lds_bank`.
    """

    model: nnx.Module
    banks: list[dict[str, Any]]


def distill_model(
    model: nnx.Module,
    *,
    num_states: int = DEFAULT_NUM_STATES,
    arithmetic: Arithmetic = "plain",
) -> DistilledModel:
    """A copy of ``model`` in which every :class:`STU` is replaced by its :class:`LDSLayer`.

    Everything else (embeddings, norms, MLPs, attention layers, the input model) is unchanged;
    STUs with the same ``(max_len, num_filters, variant)`` share one fitted bank. ``arithmetic``:
    ``"plain"`` float32 (default) or ``"compensated"`` (the exact mode; see
    :mod:`spectral_jax.ops.lds_arithmetic`).
    """
    one_of("distill_model", "arithmetic", arithmetic, ARITHMETICS)
    distilled = nnx.clone(model)
    targets = [
        (parent, key, child)
        for _, parent in nnx.iter_modules(distilled)
        for key, child in nnx.iter_children(parent)
        if isinstance(child, STU)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no STU layer to distill")
    banks: dict[tuple[int, int, str], tuple[LDSBank, dict[str, Any]]] = {}
    for parent, key, stu in targets:
        cfg = stu.config
        spec = (cfg.max_len, cfg.num_filters, cfg.variant)
        if spec not in banks:
            bank, report = fit_lds_bank(*spec, num_states, arithmetic=arithmetic)
            summary = {"L": spec[0], "K": spec[1], "variant": spec[2], "layers": 0, **report}
            banks[spec] = (bank, summary)
        banks[spec][1]["layers"] += 1
        layer = LDSLayer.from_stu(stu, banks[spec][0], arithmetic=arithmetic)
        setattr(parent, str(key), layer)
    return DistilledModel(distilled, [report for _, report in banks.values()])
