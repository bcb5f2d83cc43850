"""Benchmark the STU layer's training path (FFT convolution) on the local device.

Times the forward pass and forward+backward (gradient with respect to parameters and input) of
one STU layer, float32, median of several runs after compilation:

* at B=4, L=4096, d_in=d_out=64, K=24 for the full and tensordot projection modes;
* for L from 1024 to 65536 (fewer lengths with ``--quick``), to show the ~L log L growth.

Usage: python experiments/bench_stu.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from timing import median_seconds

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.nn.stu import STU, STUConfig


def time_layer(mode: str, B: int, L: int, d: int, K: int, repeats: int) -> dict:
    cfg = STUConfig(d_in=d, d_out=d, max_len=L, num_filters=K, projection=mode)
    graphdef, state = nnx.split(STU(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (B, L, d), jnp.float32)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    @jax.jit
    def forward_backward(state, x):
        def loss(params, x):
            return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

        return jax.grad(loss, argnums=(0, 1))(state, x)

    return {
        "mode": mode,
        "B": B,
        "L": L,
        "d": d,
        "K": K,
        "fwd_s": median_seconds(forward, state, x, repeats=repeats),
        "fwdbwd_s": median_seconds(forward_backward, state, x, repeats=repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    lengths = [1024, 4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]

    rows = [time_layer(mode, 4, 4096, 64, 24, repeats) for mode in ("full", "tensordot")]
    rows += [
        time_layer(mode, 4, L, 64, 24, repeats)
        for mode in ("full", "tensordot")
        for L in lengths
        if L != 4096
    ]
    rows.sort(key=lambda r: (r["mode"], r["L"]))

    print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(
        f"{'mode':<10}{'B':>3}{'L':>7}{'d':>4}{'K':>4}{'fwd s':>10}{'fwd+bwd s':>11}"
        f"{'fwd+bwd / (L log2 L) ns':>25}"
    )
    for r in rows:
        per = r["fwdbwd_s"] / (r["L"] * jnp.log2(r["L"])) * 1e9
        print(
            f"{r['mode']:<10}{r['B']:>3}{r['L']:>7}{r['d']:>4}{r['K']:>4}"
            f"{r['fwd_s']:>10.4f}{r['fwdbwd_s']:>11.4f}{float(per):>25.2f}"
        )
    if args.json:
        write_json_atomic(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
