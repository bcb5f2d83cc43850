"""The state-dict key table: every Flash STU key with the variable of ours it maps to."""

from __future__ import annotations

import dataclasses

from flax import nnx

from spectral_jax.nn.attention import SlidingWindowAttention
from spectral_jax.nn.model import SpectralModel
from spectral_jax.nn.stu import STU


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


def stu_layers(model: SpectralModel) -> list[STU]:
    return [block.mixer for block in model.blocks if isinstance(block.mixer, STU)]
