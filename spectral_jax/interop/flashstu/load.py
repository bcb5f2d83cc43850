"""Reading a Flash STU checkpoint into a :class:`~spectral_jax.nn.model.SpectralModel`, with its
import report."""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.interop.flashstu.config import TORCH_RMSNORM_EPS, model_config
from spectral_jax.interop.flashstu.files import locate, read_config, read_state
from spectral_jax.interop.flashstu.filters import (
    FLOAT32_FILTER_TOLERANCE,
    FilterAlignment,
    align_filters,
    flashstu_filters,
)
from spectral_jax.interop.flashstu.keys import state_entries, stu_layers
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.ops.filters import spectral_filters


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What :func:`read` mapped: ``mapped`` (checkpoint key, our variable path) pairs; the
    filters' ``reference`` (where the filters Flash STU convolves with come from) and
    ``alignment`` to ours (None for a model without STU layers, or when ``keep_phi`` kept
    filters that are not ours); ``kept_phi``."""

    config: ModelConfig
    mapped: tuple[tuple[str, str], ...]
    reference: str | None
    alignment: FilterAlignment | None
    kept_phi: bool

    def differing_filters(self) -> list[int]:
        """The checkpoint's filters (its column order) whose difference from ours exceeds
        :data:`FLOAT32_FILTER_TOLERANCE`: a bf16 ``phi``, or smallest eigenvalues that the
        dense ``eigh`` does not resolve."""
        if self.alignment is None:
            return []
        return [int(j) for j in np.flatnonzero(self.alignment.diffs > FLOAT32_FILTER_TOLERANCE)]

    def lines(self) -> list[str]:
        c = self.config
        lines = [
            f"Flash STU: {c.num_layers} layers ({''.join(c.layer_kinds)}), d_model {c.d_model}, "
            f"vocab {c.vocab_size}, seq_len {c.max_len}, {c.stu_projection} STU "
            f"({c.stu_variant}), norm eps {c.norm_eps:.3g}, {c.dtype} activations",
            f"mapped {len(self.mapped)} tensors, e.g. "
            + ", ".join(f"{k} -> {p}" for k, p in self.mapped[:3]),
        ]
        if self.reference is not None:
            kept = "kept as the model's filters" if self.kept_phi else "replaced by ours"
            line = f"filters: {self.reference}, {kept}"
            if self.alignment is not None:
                a = self.alignment
                worst = int(np.argmax(a.diffs))
                line += (
                    f"; largest difference from ours {a.diffs.max():.2e} (filter {worst}, "
                    f"relative to the largest entry)"
                )
            lines.append(line)
            differ = self.differing_filters()
            if differ and not self.kept_phi:
                lines.append(
                    f"filters {differ} differ from ours by more than float32 rounding "
                    f"({FLOAT32_FILTER_TOLERANCE:.0e}): load with keep_phi=True (--keep-phi) "
                    "for flash-stu-2's exact function"
                )
        return lines


def read(
    path: str | pathlib.Path, *, norm_eps: float = TORCH_RMSNORM_EPS, keep_phi: bool | None = None
) -> tuple[SpectralModel, ImportReport]:
    """``(model, report)`` for a Flash STU checkpoint (see :func:`load`)."""
    config_path, weights_path = locate(path)
    config = model_config(read_config(config_path), norm_eps=norm_eps, keep_phi=bool(keep_phi))
    state = read_state(weights_path)
    # abstract: every variable is set below (the filters from ours or the checkpoint's)
    model = _abstract_model(config)
    entries = state_entries(model)
    stus = stu_layers(model)
    expected = {e.key for e in entries} | ({"phi"} if stus else set())
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - expected - {"lm_head.weight", "phi"})
    if missing or unknown:
        raise ValueError(
            f"{weights_path} does not fit its config.json: missing keys {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unknown keys {unknown[:6]}"
            f"{'...' if len(unknown) > 6 else ''}"
        )
    if "lm_head.weight" in state and not np.array_equal(
        state["lm_head.weight"], state["tok_emb.weight"]
    ):
        raise ValueError(
            "lm_head.weight differs from tok_emb.weight: Flash STU ties them, so the checkpoint "
            "is not a FlashSTU state dict"
        )
    alignment, reference = None, None
    if stus:
        cfg = stus[0].config
        ours = spectral_filters(cfg.max_len, cfg.num_filters, cfg.variant)[0]
        if config.stu_projection == "tensordot":
            reference, phi = "the checkpoint's phi", state["phi"].astype(np.float64)
            if phi.shape != ours.shape:
                swapped = phi.shape == (cfg.num_filters, cfg.num_filters)
                raise ValueError(
                    f"phi has shape {phi.shape}, expected {ours.shape} [seq_len, num_eigh]"
                    + (  # get_spectral_filters(num_eigh, seq_len) instead of (seq_len, num_eigh)
                        ": this flash-stu-2 version built its filters with seq_len and num_eigh "
                        "swapped, so its STU convolves with num_eigh taps; such checkpoints are "
                        "not supported"
                        if swapped
                        else ""
                    )
                )
        else:
            reference = "Flash STU's own eigh (full mode ignores phi)"
            phi = flashstu_filters(cfg.max_len, cfg.num_filters, cfg.variant == "hankel_l")
        try:
            alignment = align_filters(phi, ours)
        except ValueError:
            if not keep_phi:
                raise
        if keep_phi is None:  # keep filters that float32 rounding does not explain (a bf16 phi)
            keep_phi = bool(np.any(alignment.diffs > FLOAT32_FILTER_TOLERANCE))
            if keep_phi:
                config = model_config(read_config(config_path), norm_eps=norm_eps, keep_phi=True)
                model = _abstract_model(config)
                entries, stus = state_entries(model), stu_layers(model)
        filters = stus[0].filters  # one variable, shared by every STU layer
        filters.set_value(jnp.asarray(phi if keep_phi else ours, filters.dtype))
    mapped = []
    for entry in entries:
        value = np.asarray(state[entry.key])
        if value.shape != entry.flash_shape():
            raise ValueError(
                f"{entry.key} has shape {value.shape}, expected {entry.flash_shape()} "
                f"(from config.json)"
            )
        value = value.astype(np.float64)
        if entry.kind == "linear":
            value = value.T
        elif entry.kind == "mixture" and not keep_phi:
            value = alignment.to_ours(value)
        entry.variable.set_value(jnp.asarray(value, entry.variable.dtype))
        mapped.append((entry.key, entry.path))
    report = ImportReport(config, tuple(mapped), reference, alignment, bool(keep_phi))
    return model, report


def _abstract_model(config: ModelConfig) -> SpectralModel:
    return nnx.eval_shape(lambda: SpectralModel(config, rngs=nnx.Rngs(0)))


def load(
    path: str | pathlib.Path, *, norm_eps: float = TORCH_RMSNORM_EPS, keep_phi: bool | None = None
) -> SpectralModel:
    """A Flash STU checkpoint as a :class:`SpectralModel` computing the same function.

    path: a ``save_pretrained`` directory, or a ``.safetensors`` / ``.pt`` file with
      ``config.json`` beside it.
    norm_eps: the RMSNorm epsilon, which the checkpoint does not record:
      :data:`TORCH_RMSNORM_EPS` (torch's RMSNorm, the default) or :data:`LIGER_RMSNORM_EPS`
      (trained with liger_kernel installed).
    keep_phi: keep the filters Flash STU convolves with (the approx mode's ``phi``, the full
      mode's own ``eigh``) instead of ours, with the mixtures as stored. None (the default):
      keep them exactly when they differ from ours by more than float32 rounding
      (:data:`FLOAT32_FILTER_TOLERANCE`), e.g. flash-stu-2's bf16 ``phi``, so that the logits
      are flash-stu-2's; False: always ours (what distillation fits).

    ``ValueError`` names the key for a missing or unknown key, a shape that does not fit
    ``config.json``, or an unsupported config; :func:`read` also returns the import report.
    """
    return read(path, norm_eps=norm_eps, keep_phi=keep_phi)[0]
