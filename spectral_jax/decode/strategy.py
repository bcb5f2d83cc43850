"""Decoding strategies: the one place a strategy name becomes the model and options that decode.

The names are :data:`~spectral_jax.validation.GenerationStrategy`:

* ``naive``, ``futurefill``: the model's STU layers decode with that
  :class:`~spectral_jax.nn.mixer.DecodeOptions` strategy;
* ``lds``: the distilled model decodes (every STU replaced by its
  :class:`~spectral_jax.nn.lds_layer.LDSLayer`, which steps its recurrence and ignores the
  options). A model with no STU layer (already distilled, or attention only) is used as it is.

:func:`decode_plan` takes any module holding sequence layers, a whole
:class:`~spectral_jax.nn.model.SpectralModel` or one layer (with ``lds``, a bare STU needs its
distilled copy passed: ``distill_model`` replaces the STUs inside a module).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from spectral_jax.distill.fit import DEFAULT_NUM_STATES
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.nn.stu import STU
from spectral_jax.validation import GENERATION_STRATEGIES, Arithmetic, GenerationStrategy, one_of


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What decodes a strategy: pass ``model`` and ``options`` to ``prefill`` / ``generate``.

    banks: when :func:`decode_plan` distilled the model itself, the per-bank fit reports of
      :func:`~spectral_jax.nn.distillation.distill_model` (to print); else None.
    """

    model: nnx.Module
    options: DecodeOptions
    banks: list[dict[str, Any]] | None = None


def _contains(module: nnx.Module, kind: type) -> bool:
    """Whether ``module`` is, or holds, a layer of type ``kind``."""
    return any(isinstance(m, kind) for _, m in nnx.iter_modules(module))


def decode_plan(
    model: nnx.Module,
    strategy: GenerationStrategy,
    *,
    num_states: int = DEFAULT_NUM_STATES,
    arithmetic: Arithmetic = "plain",
    distilled: nnx.Module | None = None,
) -> DecodePlan:
    """The model and :class:`DecodeOptions` that decode ``model`` with ``strategy``.

    ``naive`` / ``futurefill`` decode ``model`` itself (``ValueError`` if it has LDS layers: a
    distilled model decodes only with ``lds``). ``lds`` decodes, in this order: ``distilled``
    if given (a distilled copy of ``model`` the caller already made, e.g. to report its error;
    it must hold no STU layer), ``model`` itself if it holds no STU layer, else
    ``distill_model(model, num_states=num_states, arithmetic=arithmetic)``, whose bank reports
    the plan keeps. ``distilled`` is ignored by the other strategies, so one call serves a loop
    over all three.
    """
    one_of("decode_plan", "strategy", strategy, GENERATION_STRATEGIES)
    if strategy != "lds":
        if _contains(model, LDSLayer):
            raise ValueError(
                f"this {type(model).__name__} is distilled (it has LDS layers): strategy "
                f"{strategy!r} decodes STU layers; use strategy 'lds'"
            )
        return DecodePlan(model, DecodeOptions(strategy))
    if distilled is not None:
        if _contains(distilled, STU):
            raise ValueError(
                "decode_plan: the distilled copy still has STU layers; pass "
                "distill_model(model).model, or leave distilled=None to distill here"
            )
        return DecodePlan(distilled, DEFAULT_DECODE)
    if not _contains(model, STU):
        return DecodePlan(model, DEFAULT_DECODE)
    if isinstance(model, STU):
        raise ValueError(
            "decode_plan: a bare STU layer cannot be distilled in place; pass "
            "distilled=LDSLayer.from_stu(stu)"
        )
    result = distill_model(model, num_states=num_states, arithmetic=arithmetic)
    return DecodePlan(result.model, DEFAULT_DECODE, result.banks)
