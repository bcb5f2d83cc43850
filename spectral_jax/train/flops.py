"""Model FLOPs per token, and the peak FLOP/s of common accelerators, for MFU.

``forward_flops_per_token(config, seq_len, batch)`` counts the floating-point operations of
one forward pass of ``SpectralModel(config)`` per token, as the model is written (a multiply
and an add are 2 FLOPs):

- input: token embedding lookup 0; vector input ``2 d_input D``.
- LM / regression head: ``2 D V`` (``V = out_dim``; tied or not).
- every block's SwiGLU MLP: ``6 D F`` (three ``D x F`` matrices).
- sliding-window attention: projections ``2 D (3D) + 2 D D = 8 D^2``; scores and values
  ``4 D k``, where ``k = (1/L) sum_{t<L} min(t + 1, W)`` is the mean number of keys a query
  sees (window ``W``, length ``L``), i.e. only the keys the causal window lets through.
- STU (length ``L``, FFT length ``n = fft_length(2L - 1)``, ``N = n // 2 + 1`` frequencies,
  ``F = 2K`` filters for the two-branch standard STU, ``K`` for Hankel-L, a real FFT of
  length ``n`` counted as ``2.5 n log2 n``):

  - ``full`` (``ops.conv.causal_conv_project``): per sequence, ``D`` forward and ``D`` inverse
    FFTs and a complex ``[D] x [D, D]`` product per frequency (``8 N D^2``); per forward call
    (shared by its ``batch`` rows), ``F`` filter FFTs and the transfer matrix
    ``[2N, F] x [F, D^2]`` (``4 N F D^2``).
  - ``tensordot``: ``M_in`` ``2 D^2`` per token; per sequence ``2D`` FFTs and ``N D`` complex
    products (6 FLOPs each); per call the kernels ``[L, F] x [F, D]`` (``2 L F D``) and their
    ``D`` FFTs. A shared mixture (``stu_shared_mixture``) is counted as the model computes it,
    ``[L, 2K] x [2K, D]`` with the one mixture stacked twice (``ops.stu_ops.tensordot_kernels``);
    its redundant half, ``2 K D / batch`` per token and STU layer, is 1.8e-4 of
    ``flashstu_pod``'s forward FLOPs at batch 1.
  - autoregressive terms: ``2 k_u D^2 + 2 k_y D^2``.

Norms, activations, rotary embeddings and softmax are elementwise and not counted. Per-call
terms are divided by ``batch * L``. Training costs ``3x`` the forward pass (the backward pass
is two matrix products per forward one); rematerialization adds recomputation that MFU, by
convention, does not count (it measures useful model FLOPs).
"""

from __future__ import annotations

import math

from spectral_jax.nn.model import ModelConfig
from spectral_jax.ops.conv import fft_length
from spectral_jax.validation import positive_int

PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}
"""Dense bf16 matrix-multiply peaks per chip, by ``jax.Device.device_kind`` prefix (vendor
data sheets). The longest matching prefix wins."""


def peak_flops(device_kind: str) -> float | None:
    """The bf16 peak FLOP/s of a device kind (``jax.devices()[0].device_kind``), or None."""
    matches = [kind for kind in PEAK_BF16_FLOPS if device_kind.startswith(kind)]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def real_fft_flops(n: int) -> float:
    """FLOPs of one real FFT of length ``n``: ``2.5 n log2 n`` (half a complex FFT)."""
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def mean_window_keys(seq_len: int, window: int) -> float:
    """``(1/L) sum_{t<L} min(t + 1, W)``: keys per query of causal sliding-window attention."""
    full = min(seq_len, window)
    ramp = full * (full + 1) / 2  # positions t < W see t + 1 keys
    return (ramp + (seq_len - full) * window) / seq_len


def stu_flops_per_token(config: ModelConfig, seq_len: int, batch: int) -> float:
    """Forward FLOPs per token of one STU layer of ``config`` (see the module docstring)."""
    D, L, K = config.d_model, seq_len, config.num_filters
    F = 2 * K if config.stu_variant == "standard" else K
    n = fft_length(2 * L - 1)
    N = n // 2 + 1
    fft = real_fft_flops(n)
    if config.stu_projection == "full":
        per_sequence = 2 * D * fft + 8 * N * D * D
        per_call = F * fft + 4 * N * F * D * D
        per_token = 0.0
    else:
        per_sequence = 2 * D * fft + 6 * N * D
        per_call = 2 * L * F * D + D * fft
        per_token = 2 * D * D
    per_token += 2 * (config.k_u + config.k_y) * D * D
    return per_token + per_sequence / L + per_call / (batch * L)


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one sliding-window attention layer."""
    D = config.d_model
    return 8 * D * D + 4 * D * mean_window_keys(seq_len, config.window)


def forward_flops_per_token(config: ModelConfig, seq_len: int, batch: int) -> float:
    """FLOPs per token of one forward pass over ``batch`` rows of ``seq_len`` tokens."""
    positive_int("forward_flops_per_token", "seq_len", seq_len)
    positive_int("forward_flops_per_token", "batch", batch)
    D = config.d_model
    total = 2 * D * config.out_dim
    if config.d_input is not None:
        total += 2 * config.d_input * D
    for kind in config.layer_kinds:
        total += 6 * D * config.hidden_dim
        if kind == "S":
            total += stu_flops_per_token(config, seq_len, batch)
        else:
            total += attention_flops_per_token(config, seq_len)
    return float(total)


def train_flops_per_token(config: ModelConfig, seq_len: int, batch: int) -> float:
    """``3 x forward_flops_per_token``: forward, and a backward pass of twice its cost."""
    return 3.0 * forward_flops_per_token(config, seq_len, batch)
