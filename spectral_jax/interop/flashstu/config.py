"""Flash STU ``config.json`` <-> :class:`~spectral_jax.nn.model.ModelConfig` (the table in
:mod:`spectral_jax.interop.flashstu`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from spectral_jax.nn.model import ModelConfig

TORCH_RMSNORM_EPS = float(np.finfo(np.float32).eps)
"""``torch.nn.RMSNorm(eps=None)``'s epsilon: float32 machine epsilon (no liger_kernel)."""
LIGER_RMSNORM_EPS = 1e-6
"""Liger's RMSNorm epsilon, which Flash STU uses when liger_kernel is installed."""


# FlashSTUConfig's defaults, which a config.json without the key gets from FlashSTUConfig(**c).
DEFAULTS: dict[str, Any] = {
    "n_embd": 1536,
    "n_heads": 8,
    "n_layers": 26,
    "seq_len": 8192,
    "window_size": 1024,
    "vocab_size": 200064,
    "mlp_scale": 12,
    "bias": False,
    "num_eigh": 24,
    "use_hankel_L": False,
    "use_approx": True,
    "use_attn": True,
    "softcap": 50.0,
    "torch_dtype": "bfloat16",
    "stu_enable_mlp_sandwich": False,
}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}
"""Flash STU ``torch_dtype`` -> our activation dtype (float16 runs in float32)."""


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key}={value!r} must be true or false")
    return value


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json: {key}={value!r} must be a positive integer")
    return value


def window_keys(window_size: Any, seq_len: int) -> int:
    """Keys per query of flash-attn's ``window_size`` (``W`` or ``(W, right)``, causal): ``W + 1``
    (the query's own key included); ``W < 0`` (unlimited) is every earlier key, ``seq_len``."""
    left = window_size
    if isinstance(window_size, list | tuple):
        if len(window_size) != 2:
            raise ValueError(f"config.json: window_size={window_size!r} must be W or [W, 0]")
        left = window_size[0]
    if isinstance(left, bool) or not isinstance(left, int):
        raise ValueError(f"config.json: window_size={window_size!r} must be an integer or a pair")
    return seq_len if left < 0 else left + 1


def model_config(
    flash: Mapping[str, Any], *, norm_eps: float = TORCH_RMSNORM_EPS, keep_phi: bool = False
) -> ModelConfig:
    """The :class:`ModelConfig` computing Flash STU's function for a ``config.json`` dict (keys
    it lacks take FlashSTUConfig's defaults, :data:`DEFAULTS`). ``ValueError`` names a key whose
    value is unsupported or malformed."""
    config = {**DEFAULTS, **flash}
    if config.get("stu_enable_mlp_sandwich"):
        raise ValueError(
            "config.json: stu_enable_mlp_sandwich=true (the STU MLP sandwich) is not supported "
            "by spectral_jax; only checkpoints without it convert"
        )
    tiling = {k: config[k] for k in ("d_in_tile", "d_out_tile") if config.get(k)}
    if tiling:
        raise ValueError(f"config.json: STU tiling {tiling} is not supported by spectral_jax")
    # transformers 4.x writes "torch_dtype", 5.x "dtype"; FlashSTUConfig reads None as float32
    dtype = flash.get("torch_dtype", flash.get("dtype", DEFAULTS["torch_dtype"]))
    dtype = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"config.json: dtype {dtype!r} must be one of {sorted(DTYPES)}")
    seq_len, approx = _int(config, "seq_len"), _flag(config, "use_approx")
    hankel_l, use_attn = _flag(config, "use_hankel_L"), _flag(config, "use_attn")
    softcap = config["softcap"]
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or softcap < 0:
        raise ValueError(f"config.json: softcap={softcap!r} must be a number >= 0 (0: none)")
    d_model = _int(config, "n_embd")
    return ModelConfig(
        d_model=d_model,
        num_layers=_int(config, "n_layers"),
        max_len=seq_len,
        vocab_size=_int(config, "vocab_size"),
        tie_embeddings=True,
        layer_pattern="SA" if use_attn else "S",
        d_hidden=d_model * _int(config, "mlp_scale"),
        mlp_activation="geglu",
        bias=_flag(config, "bias"),
        num_filters=_int(config, "num_eigh"),
        stu_variant="hankel_l" if hankel_l else "standard",
        stu_projection="tensordot" if approx else "full",
        stu_shared_mixture=approx and not hankel_l,
        stu_filters="loaded" if keep_phi else "computed",
        num_heads=_int(config, "n_heads"),
        window=window_keys(config["window_size"], seq_len),
        attention_positions="alibi",
        attention_softcap=float(softcap) if softcap > 0 else None,
        norm_eps=norm_eps,
        dtype=DTYPES[dtype],
    )


def flashstu_config(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of Flash STU's function for ``config``, or ``ValueError`` naming the
    field that Flash STU cannot express (the inverse of :func:`model_config`)."""
    approx = config.stu_projection == "tensordot"
    need = {
        "vocab_size": (config.vocab_size is not None, "a token model"),
        "tie_embeddings": (config.tie_embeddings, "True (Flash STU ties its head)"),
        "layer_pattern": (
            config.layer_pattern in ("S", "SA") and not config.attention_only,
            "'SA' or 'S' (even layers STU, odd ones attention or STU)",
        ),
        "mlp_activation": (config.mlp_activation == "geglu", "'geglu'"),
        "d_hidden": (config.hidden_dim % config.d_model == 0, "a multiple of d_model"),
        "attention_positions": (
            config.attention_positions == "alibi" or "A" not in config.layer_kinds,
            "'alibi'",
        ),
        "k_u, k_y": (config.k_u == config.k_y == 0, "0 (Flash STU has no AR terms)"),
        "stu_shared_mixture": (
            config.stu_shared_mixture == (approx and config.stu_variant == "standard"),
            "True exactly for a standard tensordot STU (Flash STU's approx mode)",
        ),
    }
    for field, (ok, what) in need.items():
        if not ok:
            raise ValueError(
                f"Flash STU cannot express this model: ModelConfig.{field} must be {what}"
            )
    return {
        "model_type": "FlashSTU",
        "architectures": ["FlashSTU"],
        "bsz": 1,
        "n_embd": config.d_model,
        "n_heads": config.num_heads,
        "n_layers": config.num_layers,
        "seq_len": config.max_len,
        "window_size": config.window - 1,
        "vocab_size": config.vocab_size,
        "mlp_scale": config.hidden_dim // config.d_model,
        "bias": config.bias,
        "dropout": 0.0,
        "num_eigh": config.num_filters,
        "use_hankel_L": config.stu_variant == "hankel_l",
        "use_flash_fft": False,
        "use_approx": approx,
        "use_attn": "A" in config.layer_kinds,
        "softcap": config.attention_softcap or 0.0,
        "torch_dtype": "bfloat16" if config.dtype == "bfloat16" else "float32",
        "tie_word_embeddings": True,
        "stu_enable_mlp_sandwich": False,
    }
