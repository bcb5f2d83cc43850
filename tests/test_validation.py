"""The shared checks: what they accept, and errors that name the owner, field, value and rule."""

import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import validation as v


def test_positive_int_accepts_python_and_numpy_integers():
    assert v.positive_int("C", "n", 3) == 3
    assert v.positive_int("C", "n", np.int64(2), minimum=2) == 2
    assert v.positive_int("C", "k", 0, minimum=0) == 0


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3", None])
def test_positive_int_rejects(bad):
    with pytest.raises(ValueError, match=rf"^C\.n must be an integer >= 1, got {bad!r}$"):
        v.positive_int("C", "n", bad)


def test_int_in_range_names_the_bounds_and_why():
    assert v.int_in_range("", "K", 4, 1, 8) == 4
    with pytest.raises(ValueError, match=r"^K must be an integer in \[1, 8\] for L=8, got 9$"):
        v.int_in_range("", "K", 9, 1, 8, "for L=8")


def test_finite_float():
    assert v.finite_float("S", "temperature", 0) == 0.0
    assert v.finite_float("T", "peak", np.float32(2.5), strict=True) == 2.5
    for bad in (-1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"^S\.temperature must be a finite float >= 0, got"):
            v.finite_float("S", "temperature", bad)
    with pytest.raises(ValueError, match=r"must be a finite float > 0, got 0"):
        v.finite_float("T", "peak", 0, strict=True)


def test_one_of_lists_the_choices():
    assert v.one_of("STUConfig", "variant", "hankel_l", v.VARIANTS) == "hankel_l"
    with pytest.raises(ValueError, match=r"STUConfig\.variant must be one of .*'standard'.*'x'"):
        v.one_of("STUConfig", "variant", "x", v.VARIANTS)


def test_float_dtype():
    assert v.float_dtype("M", "dtype", "bfloat16") == jnp.bfloat16
    assert v.float_dtype("M", "dtype", jnp.float64, v.STATE_DTYPES) == jnp.float64
    with pytest.raises(ValueError, match=r"M\.dtype must be one of \('float32', 'float64'\)"):
        v.float_dtype("M", "dtype", jnp.bfloat16, v.STATE_DTYPES)
    with pytest.raises(ValueError, match="is not a dtype"):
        v.float_dtype("M", "dtype", "nonsense")


def test_choice_tuples_follow_their_literals():
    assert v.VARIANTS == ("standard", "hankel_l")
    assert v.DECODE_STRATEGIES == ("naive", "futurefill")
    assert v.ARITHMETICS == ("plain", "compensated")
    assert set(v.STATE_DTYPES) <= set(v.FLOAT_DTYPES)
