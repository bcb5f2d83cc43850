"""The model FLOP count against a count by hand for tiny configs, and the peak table."""

import dataclasses
import math

import pytest

from spectral_jax.nn.model import ModelConfig
from spectral_jax.ops.conv import fft_length
from spectral_jax.train import flops

# d_model D = 8, SwiGLU F = 16, vocabulary V = 16, one STU (K = 2 filters, two branches: 4)
# and one attention layer (window W = 4), seq_len L = 8, batch 2.
TINY = ModelConfig(
    d_model=8, num_layers=2, max_len=8, vocab_size=16, layer_pattern="SA", num_filters=2,
    window=4, num_heads=2, d_hidden=16,
)  # fmt: skip
FFT15 = 2.5 * 15 * math.log2(15)  # fft_length(2 * 8 - 1) = 15 = 3 * 5, a real FFT
HEAD = 2 * 8 * 16
MLP = 6 * 8 * 16
# projections 2*8*24 + 2*8*8; keys per query 1, 2, 3, 4, 4, 4, 4, 4 -> 26 / 8
ATTENTION = 2 * 8 * 24 + 2 * 8 * 8 + 4 * 8 * 26 / 8


def test_full_stu_hybrid_matches_a_hand_count():
    assert fft_length(15) == 15
    # full STU, N = 8 frequencies. Per sequence (/8 tokens): 8 + 8 FFTs and a complex
    # [8] x [8, 8] product per frequency (8 * 8 * 64). Per call (/16 tokens): 4 filter FFTs
    # and the transfer matrix [16, 4] x [4, 64].
    stu = (16 * FFT15 + 8 * 8 * 64) / 8 + (4 * FFT15 + 2 * 16 * 4 * 64) / 16
    want = HEAD + 2 * MLP + ATTENTION + stu
    assert flops.forward_flops_per_token(TINY, 8, 2) == pytest.approx(want, rel=1e-12)
    assert flops.train_flops_per_token(TINY, 8, 2) == pytest.approx(3 * want, rel=1e-12)


def test_tensordot_stu_with_ar_terms_matches_a_hand_count():
    config = dataclasses.replace(TINY, stu_projection="tensordot", k_u=2, k_y=1)
    # M_in 2*64; per sequence 16 FFTs and 8 * 8 complex products (6 FLOPs each); per call the
    # kernels [8, 4] x [4, 8] and their 8 FFTs; AR terms 2 * (2 + 1) * 64.
    stu = 2 * 64 + (16 * FFT15 + 6 * 8 * 8) / 8 + (2 * 8 * 4 * 8 + 8 * FFT15) / 16 + 6 * 64
    want = HEAD + 2 * MLP + ATTENTION + stu
    assert flops.forward_flops_per_token(config, 8, 2) == pytest.approx(want, rel=1e-12)


def test_regression_input_and_long_windows():
    config = ModelConfig(
        d_model=8, num_layers=1, max_len=8, d_input=3, d_output=2, attention_only=True,
        window=16, num_heads=2, d_hidden=16,
    )  # fmt: skip
    # window 16 > L = 8: query t sees t + 1 keys, 36 / 8 on average
    want = 2 * 8 * 2 + 2 * 3 * 8 + MLP + 2 * 8 * 24 + 2 * 8 * 8 + 4 * 8 * 36 / 8
    assert flops.forward_flops_per_token(config, 8, 1) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        flops.forward_flops_per_token(config, 0, 1)


def test_peak_table_matches_device_kinds_by_longest_prefix():
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("TPU v5") == 459e12
    assert flops.peak_flops("TPU v4") == 275e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("cpu") is None
