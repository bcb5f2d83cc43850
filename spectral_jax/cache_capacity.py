"""The one capacity check shared by every decode cache (attention KV, naive, FutureFill)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _raise_if_full(pos: Any, max_len: int) -> None:
    """Host-side check; ``pos`` is an int or an array of positions (under vmap)."""
    full = np.asarray(pos) >= max_len
    if np.any(full):
        first = int(np.asarray(pos)[full].flat[0])
        raise ValueError(f"step: cache is full: position {first} >= max_len={max_len}")


def check_room(pos: jax.Array, max_len: int) -> None:
    """Raise ValueError if a cache at position ``pos`` cannot take one more token.

    Concrete ``pos``: raises now. Traced ``pos`` (under jit/scan): a host callback raises,
    surfacing as a runtime error naming the position. The callback sits in a ``cond`` so it
    only runs when the cache is full; vmap turns the cond into a select that runs it every
    time, which is why the callback checks the position itself.
    """
    if isinstance(pos, jax.core.Tracer):
        jax.lax.cond(
            pos >= max_len,
            lambda p: jax.debug.callback(_raise_if_full, p, max_len),
            lambda p: None,
            pos,
        )
    else:
        _raise_if_full(pos, max_len)
