"""Flash STU checkpoints (hazan-lab/flash-stu-2's ``FlashSTU``) in and out of spectral_jax.

:func:`load` reads a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``), or a
``.safetensors`` (or, with torch installed, ``.pt``) state dict with its ``config.json`` beside
it, into a :class:`~spectral_jax.nn.model.SpectralModel` that computes the same function;
:func:`save` writes a directory that ``FlashSTU(FlashSTUConfig(**config))`` and
``load_state_dict`` accept. Safetensors are read and written with the ``safetensors`` package's
NumPy API (bfloat16 through ``ml_dtypes``); torch is never needed for them.

The architecture is a choice of our own modules' options (:func:`model_config`):

========================================  ======================================================
Flash STU ``config.json``                 :class:`~spectral_jax.nn.model.ModelConfig`
========================================  ======================================================
``n_embd``, ``n_layers``, ``seq_len``     ``d_model``, ``num_layers``, ``max_len``
``vocab_size``, tied ``lm_head``          ``vocab_size``, ``tie_embeddings=True``
``use_attn`` (even layers STU, odd attn)  ``layer_pattern="SA"`` (``"S"`` without attention)
``mlp_scale``, GeGLU (tanh GELU)          ``d_hidden = n_embd * mlp_scale``, ``"geglu"``
``bias``                                  ``bias`` (``lm_head.bias`` is the tied head's bias)
``n_heads``, ``window_size`` W / (W, 0)   ``num_heads``, ``window = W + 1`` (keys incl. own)
ALiBi (no RoPE), ``softcap`` (0: none)    ``attention_positions="alibi"``, ``attention_softcap``
``num_eigh``, ``use_hankel_L``            ``num_filters``, ``stu_variant``
``use_approx=True``                       ``stu_projection="tensordot"``, shared mixture
``use_approx=False``                      ``stu_projection="full"``
``torch_dtype`` / ``dtype``               ``dtype`` (activations; parameters stay float32)
RMSNorm (its eps is not recorded)         ``norm_eps``: ``load(..., norm_eps=...)``
========================================  ======================================================

State-dict keys (``i``: layer index; torch ``Linear`` weights ``[out, in]`` are our kernels
transposed): ``tok_emb.weight`` -> ``embed.embedding``; ``layers.i.stu_norm.weight`` /
``layers.i.attn_norm.weight`` -> ``blocks.i.mixer_norm.scale``; ``layers.i.mlp_norm.weight`` ->
``blocks.i.mlp_norm.scale``; ``layers.i.mlp.{gate,up,down}_proj.{weight,bias}`` ->
``blocks.i.mlp.{w,b}_{gate,up,down}``; ``layers.i.stu.M_inputs`` -> ``blocks.i.mixer.M_in``;
``layers.i.stu.M_filters`` -> ``blocks.i.mixer.M_filt_plus``; ``layers.i.stu.M_phi_plus`` /
``M_phi_minus`` -> ``blocks.i.mixer.M_plus`` / ``M_minus``; ``layers.i.attn.c_attn`` /
``c_proj`` -> ``blocks.i.mixer.qkv`` / ``out``; ``norm.weight`` -> ``final_norm.scale``;
``lm_head.bias`` -> ``head_bias``; ``lm_head.weight`` must equal ``tok_emb.weight``; ``phi`` ->
the filters (below). Wrapper prefixes ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) are
stripped.

Filters. Flash STU's ``phi [seq_len, K]`` holds the top-K eigenvectors of the dense Hankel matrix
from ``eigh``: ascending eigenvalue order, LAPACK's arbitrary signs, scaled by ``sigma^(1/4)``, in
the model dtype. Ours (:func:`~spectral_jax.ops.filters.spectral_filters`) are the same vectors in
descending order with fixed signs, so :func:`align_filters` matches columns and signs, and the
filter mixtures' rows (``M_filters``, ``M_phi_*``) are permuted and signed to match. The approx
mode convolves with the checkpoint's ``phi``; the full mode ignores it and uses the filters it
computes itself at construction (:func:`flashstu_filters`), so those are the reference there,
and :func:`save` writes ``M_phi_*`` in that basis (approx mode: our filters as ``phi``).
``keep_phi=True`` keeps the reference filters themselves (``stu_filters="loaded"``) for
bit-level parity; the default (None) keeps them exactly when they differ from ours by more
than float32 rounding, e.g. flash-stu-2's bf16 ``phi``; the :class:`ImportReport` gives each
filter's largest difference from ours.
Distillation fits an LDS bank to our computed filters, so distill a model loaded with
``keep_phi=False``.

Not supported (a ``ValueError`` says so): the STU MLP sandwich (``stu_enable_mlp_sandwich``)
and STU tiling (``d_in_tile`` / ``d_out_tile``).

Modules: :mod:`.config` (the config mapping), :mod:`.keys` (the key table), :mod:`.filters`
(filter alignment), :mod:`.files` (locating and reading files), :mod:`.load` and :mod:`.save`.
"""

from __future__ import annotations

from spectral_jax.interop.flashstu.config import (
    DEFAULTS,
    LIGER_RMSNORM_EPS,
    TORCH_RMSNORM_EPS,
    flashstu_config,
    model_config,
    window_keys,
)
from spectral_jax.interop.flashstu.files import read_state
from spectral_jax.interop.flashstu.filters import (
    FLOAT32_FILTER_TOLERANCE,
    FilterAlignment,
    align_filters,
    flashstu_filters,
)
from spectral_jax.interop.flashstu.keys import Entry, state_entries
from spectral_jax.interop.flashstu.load import ImportReport, load, read
from spectral_jax.interop.flashstu.save import save

__all__ = [
    "DEFAULTS",
    "FLOAT32_FILTER_TOLERANCE",
    "LIGER_RMSNORM_EPS",
    "TORCH_RMSNORM_EPS",
    "Entry",
    "FilterAlignment",
    "ImportReport",
    "align_filters",
    "flashstu_config",
    "flashstu_filters",
    "load",
    "model_config",
    "read",
    "read_state",
    "save",
    "state_entries",
    "window_keys",
]
