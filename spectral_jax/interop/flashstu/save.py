"""Writing a :class:`~spectral_jax.nn.model.SpectralModel` in Flash STU's layout."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from spectral_jax.atomic_files import write_bytes_atomic, write_text_atomic
from spectral_jax.interop.flashstu.config import flashstu_config
from spectral_jax.interop.flashstu.files import CONFIG_FILE, NUMPY_DTYPES, WEIGHTS_FILE
from spectral_jax.interop.flashstu.filters import align_filters, flashstu_filters
from spectral_jax.interop.flashstu.keys import state_entries, stu_layers
from spectral_jax.nn.model import SpectralModel


def save(model: SpectralModel, directory: str | pathlib.Path) -> list[tuple[str, str]]:
    """Write ``config.json`` and ``model.safetensors`` in Flash STU's layout into ``directory``
    (created; existing files there are not overwritten); returns the (our variable path,
    checkpoint key) pairs written. Tensors are in the config's ``torch_dtype``. Approx mode,
    which convolves with the ``phi`` it loads, gets the model's own filters as ``phi`` and its
    mixtures unchanged; full mode, which computes its filters itself, gets ``phi`` and
    ``M_phi_*`` in the basis of :func:`flashstu_filters` (a dense ``eigh``: ``O(seq_len^3)``,
    minutes at 8192)."""
    from safetensors.numpy import save as to_bytes

    config = flashstu_config(model.config)
    directory = pathlib.Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (directory / name).exists():
            raise ValueError(f"{directory / name} exists: export into a new directory")
    entries = state_entries(model)
    dtype = NUMPY_DTYPES[config["torch_dtype"]]
    tensors: dict[str, np.ndarray] = {}
    stus = stu_layers(model)
    alignment = None
    if stus:
        filters = np.asarray(stus[0].filters[...], np.float64)
        if config["use_approx"]:  # convolves with the phi it loads: ours, mixtures unchanged
            phi = filters
        else:
            cfg = stus[0].config
            phi = flashstu_filters(cfg.max_len, cfg.num_filters, cfg.variant == "hankel_l")
            alignment = align_filters(phi, filters)
        tensors["phi"] = phi
    written = []
    for entry in entries:
        value = np.asarray(entry.variable[...], np.float64)
        if entry.kind == "linear":
            value = value.T
        elif entry.kind == "mixture" and alignment is not None:
            value = alignment.to_reference(value)
        tensors[entry.key] = value
        written.append((entry.path, entry.key))
    tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    written.append(("embed.embedding", "lm_head.weight"))
    data = to_bytes({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()})
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / WEIGHTS_FILE, data)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return written
