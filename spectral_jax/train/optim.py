"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping.

Weight decay applies only to matrices: parameters with fewer than two dimensions
(biases, norm scales) and any parameter whose path names a norm or a bias are
excluded.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from spectral_jax.validation import positive_int

_NO_DECAY_NAMES = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int = 10_000  # warmup included; the schedule stays at the floor after
    min_lr_ratio: float = 0.1  # final learning rate / peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        positive_int("OptimConfig", "warmup_steps", self.warmup_steps, minimum=0)
        positive_int(
            "OptimConfig",
            f"decay_steps (> warmup_steps={self.warmup_steps})",
            self.decay_steps,
            minimum=self.warmup_steps + 1,
        )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    """0 -> peak linearly over ``warmup_steps``, then cosine to ``min_lr_ratio * peak``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)).lower())
                break
    return names


def weight_decay_mask(params):
    """True for leaves that get weight decay: >= 2-D and not named like a norm/bias."""

    def decays(path, leaf) -> bool:
        names = _path_names(path)
        named_exempt = any(tag in name for name in names for tag in _NO_DECAY_NAMES)
        return leaf.ndim >= 2 and not named_exempt

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clip (global norm), then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask,
    )
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
