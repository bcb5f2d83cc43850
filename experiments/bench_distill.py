"""Benchmark SpectraLDS distillation: accuracy per state, float32 fidelity and fit time.

Rows (each fit cold: empty on-disk cache, in-memory filter cache cleared; the first row also pays
JAX compilation):

* the error-vs-states curve at L=8192, K=24, standard: 40..200 states (both signs counted);
* coverage: L in {1024, 65536}, K in {8, 16, 32}, Hankel-L.

Columns: ``rel_err_f64`` is the relative Frobenius error of the float64 bank over all filters
(2K for standard). ``rel_err_f32_layer_plain`` is the float32 fidelity of the distilled layer at
its default arithmetic: an STU with random projections (full mode, d_in = d_out = 8, default
init) is run in float64, its distilled LDS layer entirely in float32 as the recurrence that
decoding runs (parallel scan, plain float32 readout and projection; a bank whose grid was chosen
for plain arithmetic, ``rel_err_f64_plain_bank``) on the same random input (B=1, length L), and
the relative Frobenius error of the outputs is reported; ``rel_err_f32_layer`` is the same with
the compensated arithmetic (float32 pairs, the exact mode); ``rel_err_f32_layer_fft`` the plain
layer's FFT prefill (kernels formed in float64), and ``rel_err_f32_stu`` the float32 FFT STU
against the float64 one (the floor any float32 path faces).

A speed section times, in the same run, the jitted float32 STU and distilled layer (plain and
compensated; FFT forward, and the parallel scan it replaced) on the fidelity problem (B=1, d=8,
L=8192), and one decode step of each LDS layer; it reports the compensated/plain cost ratios.

``--levers`` (implied without ``--quick``) adds, at L=8192, K=24, the float32 error of the bank's
impulse responses under alternative design choices (decays rounded after the fit, ridge,
scan algorithm, compensation).

Usage: python experiments/bench_distill.py [--quick] [--levers] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.distill.bank import LDSBank
from spectral_jax.distill.fit import fit_lds_bank, solve_coefficients, target_filters
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.ops import filters, lds
from spectral_jax.ops import lds_compensated as lc

D = 8


def fit_cold(L: int, K: int, variant: str, states: int, **kwargs):
    """Fit with an empty on-disk cache and a cleared in-memory filter cache: (bank, report, s)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPECTRAL_JAX_CACHE"] = tmp
        filters.clear_memory_cache()
        start = time.perf_counter()
        bank, report = fit_lds_bank(L, K, variant, states, **kwargs)
        return bank, report, time.perf_counter() - start


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def layer_errors(bank: LDSBank, plain_bank: LDSBank, seed: int = 0) -> dict[str, float]:
    """Float32 distilled layer (compensated with ``bank``, plain with ``plain_bank``, each fitted
    for its arithmetic) and float32 STU vs the float64 STU."""
    L, K, variant = bank.seq_len, bank.num_filters, bank.variant
    stu = STU(STUConfig(D, D, L, K, variant), rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (1, L, D), jnp.float32)
    with jax.enable_x64(True):
        cfg64 = STUConfig(D, D, L, K, variant, dtype=jnp.float64, param_dtype=jnp.float64)
        stu64 = STU(cfg64, rngs=nnx.Rngs(seed))
        for name, value in stu.params().items():
            getattr(stu64, name)[...] = jnp.asarray(value, jnp.float64)
        reference = np.asarray(stu64(jnp.asarray(x, jnp.float64)))
    out = {"rel_err_f32_stu": relative(stu(x), reference)}
    for arithmetic, key, b in (
        ("compensated", "rel_err_f32_layer", bank),
        ("plain", "rel_err_f32_layer_plain", plain_bank),
    ):
        layer = LDSLayer.from_stu(stu, b, arithmetic=arithmetic)
        out[key] = relative(layer(x, scan="parallel"), reference)
    out["rel_err_f32_layer_fft"] = relative(layer(x), reference)  # plain (the last one)
    return out


def row(L: int, K: int, variant: str, states: int) -> dict:
    bank, report, seconds = fit_cold(L, K, variant, states, arithmetic="compensated")
    plain_bank, plain_report, _ = fit_cold(L, K, variant, states, arithmetic="plain")
    return {
        "L": L,
        "K": K,
        "variant": variant,
        "states": bank.num_states,
        "rel_err_f64": report["rel_fro_err"],
        **layer_errors(bank, plain_bank),
        "rel_err_f64_plain_bank": plain_report["rel_fro_err"],
        "fit_seconds": seconds,
        "max_abs_err": report["max_abs_err"],
        "amplification": report["amplification"],
        "coeff_max_abs": report["coeff_max_abs"],
        "x_range": [bank.metadata["x_min"], bank.metadata["x_max"]],
    }


def textbook_parallel_scan(decays: jax.Array, u: jax.Array) -> jax.Array:
    """The usual associative scan, ``(a1 a2, a2 b1 + b2)``: powers by repeated squaring."""
    a = jnp.broadcast_to(decays, u.shape)
    return jax.lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (a, u), axis=1)[
        1
    ]


def impulse_error(branch_decays, coeffs, targets, scan: str, scaled: bool = False) -> float:
    """Float32 impulse responses of a bank under a given scan/readout, vs exact filters.
    ``scaled``: states driven by ``(1 - |a|) u`` (unit-gain states), coefficients divided by it."""
    L = targets.shape[0]
    decays = jnp.asarray(branch_decays, jnp.float32)
    gain = 1.0 - np.abs(branch_decays) if scaled else np.ones(branch_decays.shape)
    impulse = jnp.zeros((1, L, *decays.shape), jnp.float32).at[0, 0].set(jnp.float32(gain))
    weights = lc.split_float64(coeffs[None] / gain[:, :, None])  # [S, n, K]
    if scan == "compensated":
        out = lc.readout(lc.parallel_scan(decays, impulse), weights)
    else:
        fn = {"exact-power": lds.parallel_scan, "sequential": lds.scan}.get(
            scan, textbook_parallel_scan
        )
        states = fn(decays, impulse)
        out = jnp.matmul(states[..., None, :], weights.hi, precision=jax.lax.Precision.HIGHEST)
        out = out[..., 0, :]
    return relative(out[0].reshape(L, -1), targets)


def levers(states: int, L: int = 8192, K: int = 24) -> list[dict]:
    """Float32 impulse-response error of the bank under alternative choices (one at a time)."""
    targets = target_filters(L, K, "standard")
    phi = targets[:, :K]
    bank, report, _ = fit_cold(L, K, "standard", states, arithmetic="compensated")
    x_min, x_max = bank.metadata["x_min"], bank.metadata["x_max"]
    base = dict(bank=bank, decays=bank.branch_decays(), coeffs=bank.coeffs)
    results = []

    def add(name, decays, coeffs, fit_err, scan="exact-power", scaled=False):
        results.append(
            {
                "states": states,
                "lever": name,
                "rel_err_f64": fit_err,
                "rel_err_f32_impulse": impulse_error(decays, coeffs, targets, scan, scaled),
                "coeff_max_abs": float(np.abs(coeffs).max()),
            }
        )

    add(
        "baseline (auto grid, ridge 1e-12, f32-exact decays, exact-power scan)",
        base["decays"],
        base["coeffs"],
        report["rel_fro_err"],
    )
    add("sequential scan", base["decays"], base["coeffs"], report["rel_fro_err"], "sequential")
    add(
        "textbook associative scan",
        base["decays"],
        base["coeffs"],
        report["rel_fro_err"],
        "textbook",
    )
    add(
        "compensated scan + readout",
        base["decays"],
        base["coeffs"],
        report["rel_fro_err"],
        "compensated",
    )
    add(
        "states scaled to unit gain",
        base["decays"],
        base["coeffs"],
        report["rel_fro_err"],
        scaled=True,
    )
    # Decays rounded to float32 only after the fit.
    x = np.linspace(x_min, x_max, states // 2)
    exact = np.exp(-np.exp(x))
    with jax.enable_x64(True):
        coeffs, err, _, _ = solve_coefficients(jnp.asarray(exact), jnp.asarray(phi), 1e-12)
    coeffs = np.asarray(coeffs)
    rounded = exact.astype(np.float32).astype(np.float64)
    add("decays rounded to f32 after the fit", np.stack([rounded, -rounded]), coeffs, float(err))
    for ridge in (0.0, 1e-10, 1e-8):
        b, r, _ = fit_cold(L, K, "standard", states, ridge=ridge, x_range=(x_min, x_max))
        add(f"ridge {ridge:g}", b.branch_decays(), b.coeffs, r["rel_fro_err"])
    for x_range in ((-np.log(L) - 2.0, 2.0), (-np.log(L) + 0.75, 4.0)):
        b, r, _ = fit_cold(L, K, "standard", states, x_range=x_range)
        add(
            f"grid x in [{x_range[0]:.2f}, {x_range[1]:.2f}]",
            b.branch_decays(),
            b.coeffs,
            r["rel_fro_err"],
        )
    return results


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed(L: int = 8192, K: int = 24, states: int = 120) -> dict[str, float]:
    """Seconds per forward pass (B=1, d=8) and per decode step, all jitted, float32."""
    bank, _, _ = fit_cold(L, K, "standard", states, arithmetic="compensated")
    stu = STU(STUConfig(D, D, L, K), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, L, D), jnp.float32)
    forward = nnx.jit(lambda layer, x: layer(x))
    scanned = nnx.jit(lambda layer, x: layer(x, scan="parallel"))
    step = nnx.jit(lambda layer, cache, x_t: layer.step(cache, x_t)[1])
    out = {"forward_stu_fft": median_seconds(forward, stu, x)}
    for arithmetic in ("plain", "compensated"):
        layer = LDSLayer.from_stu(stu, bank, arithmetic=arithmetic)
        out[f"forward_lds_{arithmetic}"] = median_seconds(forward, layer, x)
        out[f"forward_lds_{arithmetic}_parallel_scan"] = median_seconds(scanned, layer, x)
        cache = layer.init_cache(1, L)
        out[f"step_lds_{arithmetic}"] = median_seconds(step, layer, cache, x[:, 0], repeats=50)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, no levers")
    parser.add_argument("--levers", action="store_true", help="measure design levers")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    if args.quick:
        specs = [(8192, 24, "standard", s) for s in (80, 120, 160)] + [(1024, 24, "hankel_l", 120)]
    else:
        specs = [(8192, 24, "standard", s) for s in range(40, 201, 20)]
        specs += [(1024, 24, "standard", 120), (65536, 24, "standard", 120)]
        specs += [(8192, k, "standard", 120) for k in (8, 16, 32)]
        specs += [(8192, 24, "hankel_l", 120), (65536, 32, "standard", 160)]
    rows = []
    names = ("f64 fit", "f32 comp", "f32 plain", "plain fft", "f32 STU")
    header = f"{'L':>6} {'K':>3} {'variant':>9} {'states':>6} " + " ".join(f"{n:>9}" for n in names)
    header += f" {'fit s':>6}"
    print(header)
    for spec in specs:
        r = row(*spec)
        rows.append(r)
        print(
            f"{r['L']:>6} {r['K']:>3} {r['variant']:>9} {r['states']:>6} {r['rel_err_f64']:>9.2e} "
            f"{r['rel_err_f32_layer']:>9.2e} {r['rel_err_f32_layer_plain']:>9.2e} "
            f"{r['rel_err_f32_layer_fft']:>9.2e} "
            f"{r['rel_err_f32_stu']:>9.2e} {r['fit_seconds']:>6.1f}",
            flush=True,
        )
    results = {"rows": rows}
    results["speed"] = timing = speed()
    print("\nSpeed (L=8192, K=24, 120 states, B=1, d=8; jitted float32, median seconds)")
    for name, seconds in timing.items():
        print(f"  {name:<24} {seconds * 1e3:9.3f} ms")
    for kind in ("forward", "step"):
        ratio = timing[f"{kind}_lds_compensated"] / timing[f"{kind}_lds_plain"]
        print(f"  {kind}: compensated / plain = {ratio:.2f}")
    if args.levers or not args.quick:
        results["levers"] = []
        print("\nLevers (L=8192, K=24): float32 impulse-response error of the bank")
        print(f"{'states':>6} {'f64 fit':>9} {'f32 imp.':>9} {'max|W|':>9}  lever")
        for states in (120, 160):
            for lever in levers(states):
                results["levers"].append(lever)
                print(
                    f"{lever['states']:>6} {lever['rel_err_f64']:>9.2e} "
                    f"{lever['rel_err_f32_impulse']:>9.2e} {lever['coeff_max_abs']:>9.2e}  "
                    f"{lever['lever']}",
                    flush=True,
                )
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
