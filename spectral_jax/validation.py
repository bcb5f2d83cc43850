"""The checks every config shares, and the typed choices they check against.

This module sits below every floor (``ops`` included): it imports nothing from spectral_jax.
Each choice is a ``Literal`` alias declared once, with the tuple of its values derived from it,
so type checkers and run-time checks read the same list.

Errors name the owner and the field, the value received and what is allowed, e.g.
``ValueError: STUConfig.max_len must be an integer >= 2, got 1``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import jax.numpy as jnp
import numpy as np

# ---- typed choices ---------------------------------------------------------------------------

Variant = Literal["standard", "hankel_l"]
"""Spectral filters: two-branch Hankel (``standard``) or the one-branch Hankel-L variant."""
Projection = Literal["full", "tensordot"]
"""STU projection: ``full`` ``M: [2K, d_in, d_out]``, or the tensordot approximation."""
DecodeStrategy = Literal["naive", "futurefill"]
"""How a convolutional (STU) layer decodes: input history, or epoched FutureFill."""
GenerationStrategy = Literal[DecodeStrategy, "lds"]
"""How a model generates: its STU layers with a :data:`DecodeStrategy`, or ``lds``, the distilled
model (every STU an LDS layer stepping its recurrence)."""
Arithmetic = Literal["plain", "compensated"]
"""Float arithmetic of a distilled LDS: one float32 per state, or float32 pairs (exact mode)."""
ScanKind = Literal["fft", "parallel", "sequential"]
"""How an LDS runs over a whole sequence: FFT convolution, associative scan, ``lax.scan``."""
Remat = Literal["none", "full", "save_dots"]
"""Per-block rematerialization: keep every activation, recompute all, or keep matmul outputs."""

VARIANTS: tuple[str, ...] = get_args(Variant)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
DECODE_STRATEGIES: tuple[str, ...] = get_args(DecodeStrategy)
GENERATION_STRATEGIES: tuple[str, ...] = get_args(GenerationStrategy)
ARITHMETICS: tuple[str, ...] = get_args(Arithmetic)
SCAN_KINDS: tuple[str, ...] = get_args(ScanKind)
REMATS: tuple[str, ...] = get_args(Remat)

# Activation dtypes (bf16 runs activations only; FFTs and statistics stay in float32), and the
# dtypes that can hold parameters, filters and LDS states (float64 is for references under x64).
FLOAT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")
STATE_DTYPES: tuple[str, ...] = ("float32", "float64")


def _where(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``int(value)`` if it is an integer (Python or NumPy, not a ``bool``) ``>= minimum``, else
    ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{_where(owner, name)} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite_float(
    owner: str, name: str, value: Any, minimum: float = 0.0, *, strict: bool = False
) -> float:
    """``float(value)`` if it is a finite real number (not a ``bool``) ``>= minimum`` (``>`` if
    ``strict``), else ``ValueError``."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and np.isfinite(value)
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        rule = ">" if strict else ">="
        raise ValueError(
            f"{_where(owner, name)} must be a finite float {rule} {minimum:g}, got {value!r}"
        )
    return float(value)


def int_in_range(owner: str, name: str, value: Any, low: int, high: int, why: str = "") -> int:
    """``int(value)`` if it is an integer in ``[low, high]``, else ``ValueError`` (``why``, if
    given, is appended to the message: what sets the bounds)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not low <= value <= high
    ):
        suffix = f" {why}" if why else ""
        raise ValueError(
            f"{_where(owner, name)} must be an integer in [{low}, {high}]{suffix}, got {value!r}"
        )
    return int(value)


def one_of(owner: str, name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"{_where(owner, name)} must be one of {allowed}, got {value!r}")
    return value


def float_dtype(owner: str, name: str, value: Any, allowed: tuple[str, ...] = FLOAT_DTYPES):
    """``jnp.dtype(value)`` if its name is in ``allowed``, else ``ValueError``."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(
            f"{_where(owner, name)}={value!r} is not a dtype; allowed: {allowed}"
        ) from err
    if dtype.name not in allowed:
        raise ValueError(f"{_where(owner, name)} must be one of {allowed}, got {value!r}")
    return dtype
