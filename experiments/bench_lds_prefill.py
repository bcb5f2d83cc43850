"""Distilled prefill against the STU's, and compile time of the two LDS arithmetics, in one run.

Model: 4 layers, d_model 128, K = 24, tensordot STU layers, vocab 256, batch 1, float32,
``max_len`` = the longest prompt. Distilled with :func:`spectral_jax.nn.distillation.distill_model`
in ``plain`` (the default) and ``compensated`` arithmetic.

* Prefill: median seconds of the jitted ``model.prefill(prompt)`` (after one compiling call) of
  the STU model (FFT convolution + its FutureFill decode cache) and of the plain distilled model
  (FFT convolution + decay-power matmul for the state), at each prompt length, and the ratio.
  One LDS layer's prefill with ``scan="fft"`` against ``scan="parallel"`` (the associative scan
  the FFT replaced; skip with ``--no-parallel``).
* Compile: seconds to lower and compile a ``lax.scan`` of ``--new`` greedy decode steps of each
  distilled model (the decode loop ``generate`` runs), and the compensated / plain ratio.

Usage: python experiments/bench_lds_prefill.py [--contexts 8192 32768] [--repeats 3] [--new 64]
       [--json PATH] [--no-parallel]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from timing import median_seconds

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.nn.distillation import distill_model
from spectral_jax.nn.model import ModelConfig, SpectralModel

MODEL_PREFILL = nnx.jit(lambda model, prompt: model.prefill(prompt))
LAYER_PREFILL = nnx.jit(lambda layer, x, scan: layer.prefill(x, scan=scan), static_argnums=2)


def spectral_model(max_len: int, d_model: int = 128) -> SpectralModel:
    """The benchmarked STU model: 4 tensordot STU layers, K = 24, vocab 256."""
    config = ModelConfig(
        d_model=d_model, num_layers=4, max_len=max_len, vocab_size=256, num_filters=24,
        stu_projection="tensordot",
    )  # fmt: skip
    return SpectralModel(config, rngs=nnx.Rngs(0))


def prefill_row(
    model: SpectralModel, distilled: SpectralModel, context: int, repeats: int, parallel: bool
) -> dict:
    """Median prefill seconds of a random ``[1, context]`` prompt: ``{"context", "stu_s",
    "lds_s", "ratio"}`` (``lds_s / stu_s``), and with ``parallel`` the first distilled layer's
    ``layer_fft_s`` and ``layer_parallel_s`` (its ``scan="fft"`` and ``scan="parallel"``)."""
    prompt = jax.random.randint(jax.random.key(context), (1, context), 0, 256, jnp.int32)
    stu_s = median_seconds(MODEL_PREFILL, model, prompt, repeats=repeats)
    lds_s = median_seconds(MODEL_PREFILL, distilled, prompt, repeats=repeats)
    row = {"context": context, "stu_s": stu_s, "lds_s": lds_s, "ratio": lds_s / stu_s}
    if parallel:
        layer = distilled.blocks[0].mixer
        d_model = model.config.d_model
        x = jax.random.normal(jax.random.key(1), (1, context, d_model), jnp.float32)
        row["layer_fft_s"] = median_seconds(LAYER_PREFILL, layer, x, "fft", repeats=repeats)
        row["layer_parallel_s"] = median_seconds(LAYER_PREFILL, layer, x, "parallel", repeats=1)
    return row


def decode_compile_seconds(model: nnx.Module, new_tokens: int) -> float:
    """Seconds to lower and compile ``new_tokens`` greedy decode steps as one ``lax.scan``."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1)

    def run(state, cache, token):
        m = nnx.merge(graphdef, state)

        def advance(carry, _):
            cache, token = carry
            cache, logits = m.step(cache, token)
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (cache, token), token

        return jax.lax.scan(advance, (cache, token), None, length=new_tokens)[1]

    start = time.perf_counter()
    jax.jit(run).lower(state, cache, jnp.zeros((1,), jnp.int32)).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=64, help="decode steps in the compiled loop")
    parser.add_argument("--no-parallel", action="store_true", help="skip the parallel-scan row")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model = spectral_model(max(args.contexts))
    plain = distill_model(model).model
    compensated = distill_model(model, arithmetic="compensated").model
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")

    compile_s = {name: decode_compile_seconds(m, args.new) for name, m in
                 (("plain", plain), ("compensated", compensated))}  # fmt: skip
    ratio = compile_s["compensated"] / compile_s["plain"]
    print(
        f"decode-loop compile ({args.new} steps): plain {compile_s['plain']:.2f} s, compensated "
        f"{compile_s['compensated']:.2f} s, ratio {ratio:.2f}x"
    )

    rows = []
    for context in args.contexts:
        row = prefill_row(model, plain, context, args.repeats, parallel=not args.no_parallel)
        line = f"model prefill {context:>6}: STU {row['stu_s']:.3f} s, distilled "
        line += f"{row['lds_s']:.3f} s, ratio {row['ratio']:.2f}x"
        if "layer_fft_s" in row:
            line += f"; one layer: fft {row['layer_fft_s']:.3f} s, parallel scan "
            line += f"{row['layer_parallel_s']:.3f} s"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        out = {"compile_seconds": compile_s, "compile_ratio": ratio, "prefill": rows}
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
