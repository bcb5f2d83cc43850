"""Carried-state training ("state passing"): consecutive windows of one stream, in order.

Window ``k`` of a stream runs from the decode cache that window ``k - 1`` left (every layer's
state: a distilled LDS layer's recurrent state and AR histories, an attention layer's K/V ring
buffer), with its gradient stopped, so a window's loss trains the model to use the context
before it while memory and backpropagation stay those of one window.
"""

from __future__ import annotations

import jax
from flax import nnx


def stop_cache(cache):
    """``cache`` (any pytree, e.g. a ``ModelCache``) with the gradient stopped at every leaf."""
    return jax.tree.map(jax.lax.stop_gradient, cache)


def check_carry_model(model: nnx.Module, length: int) -> None:
    """Raise ValueError unless ``model`` can be trained on carried caches of ``length``
    consecutive positions: it needs ``prefill(x, cache=...)`` and ``init_cache`` (a
    ``SpectralModel``), and every layer must run ``length`` positions (``check_length``)."""
    missing = [
        name for name in ("prefill", "init_cache", "check_length") if not hasattr(model, name)
    ]
    if missing:
        raise ValueError(
            f"carried-state training needs a model with prefill(x, cache=...) and init_cache, "
            f"like SpectralModel; {type(model).__name__} has no {', '.join(missing)}"
        )
    model.check_length(length, f"carried-state training over {length} consecutive positions")
