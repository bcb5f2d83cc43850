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
bit-level parity, e.g. for a bf16 ``phi``; the :class:`ImportReport` gives each filter's
largest difference from ours.
Distillation fits an LDS bank to our computed filters, so distill a model loaded with
``keep_phi=False``.

Not supported (a ``ValueError`` says so): the STU MLP sandwich (``stu_enable_mlp_sandwich``)
and STU tiling (``d_in_tile`` / ``d_out_tile``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from spectral_jax.atomic_files import write_bytes_atomic, write_text_atomic
from spectral_jax.nn.attention import SlidingWindowAttention
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU
from spectral_jax.ops.filters import hankel_matrix, spectral_filters

TORCH_RMSNORM_EPS = float(np.finfo(np.float32).eps)
"""``torch.nn.RMSNorm(eps=None)``'s epsilon: float32 machine epsilon (no liger_kernel)."""
LIGER_RMSNORM_EPS = 1e-6
"""Liger's RMSNorm epsilon, which Flash STU uses when liger_kernel is installed."""

FLOAT32_FILTER_TOLERANCE = 1e-6
"""Filter differences (relative to the largest entry) above float32 storage and ``eigh``
round-off: the report names such filters."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIXES = ("_orig_mod.", "module.")

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
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# ---- configs ---------------------------------------------------------------------------------


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


# ---- filters ---------------------------------------------------------------------------------


def flashstu_filters(seq_len: int, num_filters: int, hankel_l: bool) -> np.ndarray:
    """The filters Flash STU computes itself ``[seq_len, K]`` (float64): NumPy's dense ``eigh``
    of the Hankel matrix, its top ``K`` eigenvectors in ascending eigenvalue order with LAPACK's
    signs, each times ``sigma^(1/4)``. ``O(seq_len^3)`` time, ``O(seq_len^2)`` memory."""
    sigma, phi = np.linalg.eigh(hankel_matrix(seq_len, "hankel_l" if hankel_l else "standard"))
    return phi[:, -num_filters:] * sigma[-num_filters:] ** 0.25


@dataclasses.dataclass(frozen=True)
class FilterAlignment:
    """``reference[:, j] ~= signs[j] * filters[:, order[j]]``; ``diffs[j]``: the largest
    ``|difference|`` of column ``j``, relative to the largest ``|filters|`` entry."""

    order: np.ndarray
    signs: np.ndarray
    diffs: np.ndarray

    def to_ours(self, rows: np.ndarray) -> np.ndarray:
        """Mixture rows ``[K, ...]`` in the reference's basis -> in the filters' basis."""
        out = np.empty_like(rows)
        out[self.order] = rows * self.signs.reshape(-1, *([1] * (rows.ndim - 1)))
        return out

    def to_reference(self, rows: np.ndarray) -> np.ndarray:
        """Mixture rows ``[K, ...]`` in the filters' basis -> in the reference's basis."""
        return rows[self.order] * self.signs.reshape(-1, *([1] * (rows.ndim - 1)))


def align_filters(reference: np.ndarray, filters: np.ndarray) -> FilterAlignment:
    """Match each column of ``reference [L, K]`` to the column of ``filters [L, K]`` it is up to
    sign (largest ``|cosine|``); ``ValueError`` unless that is one-to-one with every
    ``|cosine| > 0.9``, i.e. unless both hold the same filters."""
    ref, ours = np.asarray(reference, np.float64), np.asarray(filters, np.float64)
    if ref.shape != ours.shape:
        raise ValueError(f"phi has shape {ref.shape}, expected {ours.shape} [seq_len, num_eigh]")
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=0), 1e-300)  # noqa: E731
    cosine = unit(ours).T @ unit(ref)  # [K ours, K reference]
    order = np.argmax(np.abs(cosine), axis=0)
    best = np.abs(cosine[order, np.arange(ref.shape[1])])
    if len(set(order.tolist())) != ref.shape[1] or best.min() <= 0.9:
        raise ValueError(
            f"phi does not hold the spectral filters of this Hankel matrix (the best match of "
            f"filter {int(np.argmin(best))} has |cosine| {best.min():.3f}): load with "
            "keep_phi=True to use the checkpoint's own filters"
        )
    signs = np.sign(cosine[order, np.arange(ref.shape[1])])
    diffs = np.max(np.abs(ref - signs * ours[:, order]), axis=0) / np.abs(ours).max()
    return FilterAlignment(order, signs, diffs)


# ---- the key mapping -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One state-dict key: ``variable`` is ours, ``kind`` how the arrays relate: ``"copy"``,
    ``"linear"`` (torch's ``[out, in]`` is our kernel transposed) or ``"mixture"`` (filter
    mixture rows, permuted and signed by the filter alignment)."""

    key: str
    path: str
    variable: nnx.Variable
    kind: str

    def flash_shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.shape)
        return shape[::-1] if self.kind == "linear" else shape


def _linear(entries: list, key: str, path: str, linear: nnx.Linear) -> None:
    entries.append(Entry(f"{key}.weight", f"{path}.kernel", linear.kernel, "linear"))
    if linear.bias is not None:
        entries.append(Entry(f"{key}.bias", f"{path}.bias", linear.bias, "copy"))


def state_entries(model: SpectralModel) -> list[Entry]:
    """Every state-dict key of Flash STU's model with its variable in ``model`` (``phi`` and
    ``lm_head.weight``, which are not variables of ours, excepted). ``ValueError`` for a block
    Flash STU has no counterpart for (a distilled LDS layer)."""
    entries = [Entry("tok_emb.weight", "embed.embedding", model.embed.embedding, "copy")]
    for i, block in enumerate(model.blocks):
        key, path, mixer = f"layers.{i}", f"blocks.{i}", block.mixer
        if isinstance(mixer, STU):
            norm = "stu_norm"
            names = {"M_in": "M_inputs", "M_filt_plus": "M_filters"}
            names |= {"M_plus": "M_phi_plus", "M_minus": "M_phi_minus"}
            for name, variable in vars(mixer).items():  # a shared mixture has no M_filt_minus
                if isinstance(variable, nnx.Param):
                    kind = "copy" if name == "M_in" else "mixture"
                    flash_key = f"{key}.stu.{names[name]}"
                    entries.append(Entry(flash_key, f"{path}.mixer.{name}", variable, kind))
        elif isinstance(mixer, SlidingWindowAttention):
            norm = "attn_norm"
            _linear(entries, f"{key}.attn.c_attn", f"{path}.mixer.qkv", mixer.qkv)
            _linear(entries, f"{key}.attn.c_proj", f"{path}.mixer.out", mixer.out)
        else:
            raise ValueError(
                f"block {i} is a {type(mixer).__name__}: Flash STU has only STU and attention "
                "layers (export the model before distilling it)"
            )
        entries.append(
            Entry(
                f"{key}.{norm}.weight", f"{path}.mixer_norm.scale", block.mixer_norm.scale, "copy"
            )
        )
        entries.append(
            Entry(f"{key}.mlp_norm.weight", f"{path}.mlp_norm.scale", block.mlp_norm.scale, "copy")
        )
        for part in ("gate", "up", "down"):
            mlp_key, mlp_path = f"{key}.mlp.{part}_proj", f"{path}.mlp"
            weight = getattr(block.mlp, f"w_{part}")
            entries.append(Entry(f"{mlp_key}.weight", f"{mlp_path}.w_{part}", weight, "linear"))
            if hasattr(block.mlp, f"b_{part}"):
                bias = getattr(block.mlp, f"b_{part}")
                entries.append(Entry(f"{mlp_key}.bias", f"{mlp_path}.b_{part}", bias, "copy"))
    entries.append(Entry("norm.weight", "final_norm.scale", model.final_norm.scale, "copy"))
    if hasattr(model, "head_bias"):
        entries.append(Entry("lm_head.bias", "head_bias", model.head_bias, "copy"))
    return entries


def _stus(model: SpectralModel) -> list[STU]:
    return [block.mixer for block in model.blocks if isinstance(block.mixer, STU)]


# ---- files -----------------------------------------------------------------------------------


def _locate(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
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


def _read_config(path: pathlib.Path) -> dict[str, Any]:
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


# ---- load ------------------------------------------------------------------------------------


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
    path: str | pathlib.Path, *, norm_eps: float = TORCH_RMSNORM_EPS, keep_phi: bool = False
) -> tuple[SpectralModel, ImportReport]:
    """``(model, report)`` for a Flash STU checkpoint (see :func:`load`)."""
    config_path, weights_path = _locate(path)
    config = model_config(_read_config(config_path), norm_eps=norm_eps, keep_phi=keep_phi)
    state = read_state(weights_path)
    # abstract: every variable is set below (the filters from ours or the checkpoint's)
    model = nnx.eval_shape(lambda: SpectralModel(config, rngs=nnx.Rngs(0)))
    entries = state_entries(model)
    stus = _stus(model)
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
                raise ValueError(f"phi has shape {phi.shape}, expected {ours.shape}")
        else:
            reference = "Flash STU's own eigh (full mode ignores phi)"
            phi = flashstu_filters(cfg.max_len, cfg.num_filters, cfg.variant == "hankel_l")
        try:
            alignment = align_filters(phi, ours)
        except ValueError:
            if not keep_phi:
                raise
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
    report = ImportReport(config, tuple(mapped), reference, alignment, keep_phi)
    return model, report


def load(
    path: str | pathlib.Path, *, norm_eps: float = TORCH_RMSNORM_EPS, keep_phi: bool = False
) -> SpectralModel:
    """A Flash STU checkpoint as a :class:`SpectralModel` computing the same function.

    path: a ``save_pretrained`` directory, or a ``.safetensors`` / ``.pt`` file with
      ``config.json`` beside it.
    norm_eps: the RMSNorm epsilon, which the checkpoint does not record:
      :data:`TORCH_RMSNORM_EPS` (torch's RMSNorm, the default) or :data:`LIGER_RMSNORM_EPS`
      (trained with liger_kernel installed).
    keep_phi: keep the filters Flash STU convolves with (the approx mode's ``phi``, the full
      mode's own ``eigh``) instead of ours, with the mixtures as stored.

    ``ValueError`` names the key for a missing or unknown key, a shape that does not fit
    ``config.json``, or an unsupported config; :func:`read` also returns the import report.
    """
    return read(path, norm_eps=norm_eps, keep_phi=keep_phi)[0]


# ---- save ------------------------------------------------------------------------------------


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
    stus = _stus(model)
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
