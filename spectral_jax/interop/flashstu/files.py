"""Flash STU checkpoint files: locating ``config.json`` and the weights, reading state dicts
(safetensors through its NumPy API, ``.pt`` only with torch)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIXES = ("_orig_mod.", "module.")


NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``(config.json, weights file)`` of a save_pretrained directory or of a weights file."""
    path = pathlib.Path(path)
    if path.is_dir():
        config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not weights.exists():
            found = sorted(p.name for p in path.glob("*.safetensors")) + sorted(
                p.name for p in path.glob("*.pt")
            )
            if len(found) != 1:
                raise ValueError(
                    f"{path} has no {WEIGHTS_FILE} and {len(found)} other weight files "
                    f"{found[:4]}: pass the weights file itself"
                )
            weights = path / found[0]
    elif path.suffix in (".safetensors", ".pt"):
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        config, weights = path.parent / CONFIG_FILE, path
    else:
        raise ValueError(
            f"{path}: expected a save_pretrained directory, a .safetensors or a .pt file"
        )
    if not config.exists():
        raise ValueError(f"{config} is missing: a Flash STU checkpoint needs its config.json")
    return config, weights


def read_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_state(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A state dict ``{key: array}`` from a ``.safetensors`` file (NumPy API) or a ``.pt`` file
    (torch, ``weights_only=True``), wrapper prefixes stripped."""
    path = pathlib.Path(path)
    if path.suffix == ".pt":
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading a .pt file needs torch installed") from None
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
            raise ValueError(f"{path} does not hold a state dict {{key: tensor}}")
        raw = {k: v.to(torch.float32).numpy() for k, v in raw.items()}
    else:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            raw = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    state = {}
    for key, value in raw.items():
        name = key
        while name.startswith(PREFIXES):
            name = name.removeprefix(PREFIXES[0]).removeprefix(PREFIXES[1])
        if name in state:
            raise ValueError(f"{path}: keys {key!r} and another both map to {name!r}")
        state[name] = np.asarray(value)
    return state
