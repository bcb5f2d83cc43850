"""Distill a whole model: every STU layer becomes its :class:`~spectral_jax.nn.lds_layer.LDSLayer`.

This is the one function that distills a model and keeps the bank bookkeeping (one fit per
distinct ``(max_len, num_filters, variant)``, shared by every STU with that spec, and one report
per bank). It lives in ``nn/`` rather than in :mod:`spectral_jax.distill` because it walks an nnx
model and builds nnx layers: the pure fit (:mod:`spectral_jax.distill`) sits on the floor below
``nn`` and must not import it. Callers (CLI, demo, inference, experiments) import it from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from flax import nnx

from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.fit import DEFAULT_NUM_STATES, NO_TAIL, TailOptions, fit_lds_bank
from spectral_jax.distill.reduce import DEFAULT_TOL
from spectral_jax.nn.lds_layer import distill_stu
from spectral_jax.nn.stu import STU
from spectral_jax.validation import ARITHMETICS, Arithmetic, one_of


class DistilledModel(NamedTuple):
    """A distilled copy of a model and the fit report of each bank it uses.

    model: the copy, with every STU replaced by an :class:`LDSLayer`.
    banks: one dict per distinct bank, ``{"L", "K", "variant", "layers"}`` (``layers``: how many
      STUs use it) plus the fit report of :func:`spectral_jax.distill.fit.fit_lds_bank`, and
      ``"reduction"``: one dict per layer of that bank, in model order, with its ``"path"`` and
      the report of :func:`~spectral_jax.nn.lds_layer.distill_stu` (None where not reduced).
    """

    model: nnx.Module
    banks: list[dict[str, Any]]


def distill_model(
    model: nnx.Module,
    *,
    num_states: int = DEFAULT_NUM_STATES,
    arithmetic: Arithmetic = "plain",
    tol: float | None = DEFAULT_TOL,
    max_states: int | None = None,
    blocks: Sequence[Sequence[int]] | None = None,
    tail: TailOptions = NO_TAIL,
) -> DistilledModel:
    """A copy of ``model`` in which every :class:`STU` is replaced by its :class:`LDSLayer`.

    Everything else (embeddings, norms, MLPs, attention layers, the input model) is unchanged;
    STUs with the same ``(max_len, num_filters, variant)`` share one fitted bank. ``arithmetic``:
    ``"plain"`` float32 (default) or ``"compensated"`` (the exact mode; see
    :mod:`spectral_jax.ops.lds_arithmetic`). ``tol`` / ``max_states``: the per-channel reduction
    of tensordot layers in plain arithmetic (:func:`~spectral_jax.nn.lds_layer.distill_stu`;
    ``tol=None`` keeps the bank's states). ``blocks``: one per STU in model order, its blocks per
    channel (empty: not reduced), to build a template of a distilled checkpoint's shapes
    without reducing.
    ``tail``: the banks' horizon options (:class:`~spectral_jax.distill.fit.TailOptions`: the
    tail-penalised fit, the eigenvalue cap; off by default).
    """
    one_of("distill_model", "arithmetic", arithmetic, ARITHMETICS)
    distilled = nnx.clone(model)
    targets = [
        (path, parent, key, child)
        for path, parent in nnx.iter_modules(distilled)
        for key, child in nnx.iter_children(parent)
        if isinstance(child, STU)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no STU layer to distill")
    if blocks is not None and len(blocks) != len(targets):
        raise ValueError(f"blocks has {len(blocks)} entries for {len(targets)} STU layers")
    banks: dict[tuple[int, int, str], tuple[LDSBank, dict[str, Any]]] = {}
    for i, (path, parent, key, stu) in enumerate(targets):
        cfg = stu.config
        spec = (cfg.max_len, cfg.num_filters, cfg.variant)
        if spec not in banks:
            bank, report = fit_lds_bank(*spec, num_states, arithmetic=arithmetic, tail=tail)
            summary = {"L": spec[0], "K": spec[1], "variant": spec[2], "layers": 0, **report}
            banks[spec] = (bank, {**summary, "reduction": []})
        banks[spec][1]["layers"] += 1
        layer_tol = tol if blocks is None or len(blocks[i]) else None
        layer, reduction = distill_stu(
            stu,
            banks[spec][0],
            arithmetic=arithmetic,
            tol=layer_tol,
            max_states=max_states,
            blocks=None if blocks is None or not len(blocks[i]) else blocks[i],
        )
        name = "/".join(str(p) for p in (*path, key))
        banks[spec][1]["reduction"].append(
            {"order": i, "path": name, "blocks": list(layer.config.blocks), **(reduction or {})}
        )
        setattr(parent, str(key), layer)
    return DistilledModel(distilled, [report for _, report in banks.values()])


def layer_blocks(banks: list[dict[str, Any]]) -> list[list[int]]:
    """The blocks per channel of every distilled layer in model order (empty: not reduced),
    from :func:`distill_model`'s bank reports (what a checkpoint keeps to rebuild its
    template)."""
    layers = sorted(
        (entry for bank in banks for entry in bank["reduction"]), key=lambda e: e["order"]
    )
    return [entry["blocks"] for entry in layers]
