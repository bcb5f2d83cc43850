"""Online learning of a symmetric LDS: the SpectraLDS synthetic experiment.

The system is ``spectral_jax.train.LDSRegression``: ``x_t = A x_{t-1} + B u_t``, ``y_t = C x_t +
noise``, ``A`` symmetric with eigenvalues uniform in ``(-rho, rho)``, one at ``+-rho``, ``rho = 1 -
delta``; Gaussian ``B``, ``C`` (unit stationary output variance); ``u_t ~ N(0, I)``. Each seed
draws its own system, initialisation and data. Online learning: each step draws a fresh batch and
records the MSE on it *before* the AdamW update (what ``spectral_jax.train.train`` logs). Methods:
``stu``, one STU layer (K filters per branch, full projections), then distilled to an LDS by
``LDSLayer.from_stu`` (SpectraLDS, float32 compensated arithmetic); ``lds``, a diagonal real LDS of
the true state size trained directly, decays ``tanh(theta)`` started uniform in ``(-rho, rho)``;
``attention``, a small attention-only ``SpectralModel``. Learning rates: the best of a sweep on a
tuning seed (100, not reported; noiseless, default config) over stu {0.1, 0.3, 1}, lds {0.03,
0.1, 0.3}, attention {1e-3, 3e-3, 1e-2}.

Outputs (``--out``): ``curves.csv`` (online MSE per step and seed; geometric mean and 95%
t-interval of log MSE over seeds), ``curves.png`` (with impulse errors per lag),
``final_mse.md`` and ``summary.json`` (final MSE = mean of the last 10% of steps; first step at
which the running mean of the seed-mean online MSE is within a threshold of the noise floor;
identification: relative error of the impulse responses ``G[t] = C A^t B``, ``t < L``, against
the true system's, and held-out MSE against the noisy and the clean outputs).

    python experiments/lds_identification.py            # CPU default (L=1024, d=8): minutes
    python experiments/lds_identification.py --paper    # L=8192, batch 32, d=100, 5000 steps

``--paper`` is for a GPU or TPU, and is bound by data: ``LDSRegression.batch`` simulates on the
host with NumPy, 7-9 s per batch at that size on the loaded 2-core CPU used here (mostly two
``np.einsum`` contractions that do not use BLAS).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import operator
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from spectral_jax.atomic_files import write_json_atomic, write_text_atomic
from spectral_jax.data.tasks import LDSRegression
from spectral_jax.nn.lds_layer import LDSLayer
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig
from spectral_jax.ops import lds
from spectral_jax.train import OptimConfig, TrainConfig, train

METHODS = ("stu", "lds", "attention")
REPO = Path(__file__).resolve().parents[1]
_INTS = ("seq_len", "d_in", "d_out", "state_dim", "steps", "batch", "seeds", "num_filters")
_INTS += ("attn_d_model", "attn_layers", "attn_heads", "eval_batches", "eval_chunk")
_CHECKS = (
    *((name, lambda v: isinstance(v, int) and v >= 1, "a positive int") for name in _INTS),
    ("delta", lambda v: 0 < v < 1, "in (0, 1) (spectral radius 1 - delta)"),
    ("noise_stds", lambda v: len(v) > 0 and all(s >= 0 for s in v), "a tuple of values >= 0"),
    ("learning_rates", lambda v: len(v) == 3 and all(r > 0 for r in v), "3 positive numbers"),
    ("attn_window", lambda v: v is None or v >= 1, "None (whole sequence) or >= 1"),
    ("thresholds", lambda v: len(v) > 0 and all(t > 0 for t in v), "a tuple of positive numbers"),
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every method, noise level and seed of one run. ``noise_stds``: 0 = noiseless (the noisy
    online MSE cannot fall below ``noise_std**2``); ``learning_rates``: stu, lds, attention;
    ``attn_window``: None = whole sequence; ``eval_chunk``: sequences per evaluation call;
    ``thresholds``: excess online MSE (above the noise floor) whose first crossing is reported."""

    seq_len: int = 1024
    d_in: int = 8
    d_out: int = 8
    state_dim: int = 100
    delta: float = 1e-3
    noise_stds: tuple[float, ...] = (0.0, 0.5)
    steps: int = 200
    batch: int = 8
    seeds: int = 3
    num_filters: int = 24
    learning_rates: tuple[float, float, float] = (0.3, 0.1, 1e-2)
    attn_d_model: int = 16
    attn_layers: int = 1
    attn_heads: int = 2
    attn_window: int | None = 128
    eval_batches: int = 4
    eval_chunk: int = 8
    thresholds: tuple[float, ...] = (0.1, 0.01, 0.001)

    def __post_init__(self):
        for name, valid, allowed in _CHECKS:
            if not valid(getattr(self, name)):
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def task(self, noise_std: float, seed: int) -> LDSRegression:
        """The system of ``seed`` observed with ``noise_std``."""
        shape = dict(seq_len=self.seq_len, d_input=self.d_in, d_output=self.d_out)
        system = dict(state_dim=self.state_dim, spectral_radius=1.0 - self.delta, system_seed=seed)
        return LDSRegression(**shape, **system, noise_std=noise_std)

    def optim(self, method: str) -> OptimConfig:
        lr = self.learning_rates[METHODS.index(method)]
        warmup = max(1, self.steps // 20)
        return OptimConfig(lr, warmup_steps=warmup, decay_steps=self.steps + 1, weight_decay=0.0)


_PAPER_SCALE = dict(seq_len=8192, d_in=100, d_out=100, batch=32, steps=5000, seeds=5)
_PAPER_ATTENTION = dict(attn_d_model=64, attn_layers=2, attn_heads=4, attn_window=None)
PAPER = ExperimentConfig(**_PAPER_SCALE, **_PAPER_ATTENTION, eval_chunk=1)


class DiagonalLDS(nnx.Module):
    """``x_t = a * x_{t-1} + B u_t``, ``y_t = C x_t``, ``a = tanh(theta)``: ``[batch, L, d_in]
    -> [batch, L, d_out]``, state ``[batch, state_dim]``. Decays start uniform in
    ``(-max_decay, max_decay)``; ``C`` starts small (``N(0, 1/state_dim^2)``)."""

    def __init__(self, d_in: int, d_out: int, state_dim: int, max_decay: float, *, rngs):
        a0 = jax.random.uniform(rngs.params(), (state_dim,), minval=-max_decay, maxval=max_decay)
        self.theta = nnx.Param(jnp.arctanh(a0))
        self.B = nnx.Param(jax.random.normal(rngs.params(), (state_dim, d_in)) / math.sqrt(d_in))
        self.C = nnx.Param(jax.random.normal(rngs.params(), (d_out, state_dim)) / state_dim)

    def __call__(self, u: jax.Array) -> jax.Array:
        return self.prefill(u)[0]

    def init_cache(self, batch: int, max_len: int, dtype) -> jax.Array:
        """The zero state ``[batch, state_dim]`` (its size does not depend on ``max_len``)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        return jnp.zeros((batch, self.theta.shape[0]), dtype)

    def prefill(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        scan = lds.scan if jax.default_backend() == "cpu" else lds.parallel_scan  # faster there
        states = scan(jnp.tanh(self.theta[...]), u @ self.B[...].T)
        return states @ self.C[...].T, states[:, -1]

    def step(self, cache: jax.Array, u_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = lds.step(jnp.tanh(self.theta[...]), cache, u_t @ self.B[...].T)
        return x, x @ self.C[...].T


def model_fn(method: str, config: ExperimentConfig):
    """``rngs -> module`` for one method, ``[batch, L, d_in] -> [batch, L, d_out]``."""
    c = config
    if method == "stu":
        stu = STUConfig(d_in=c.d_in, d_out=c.d_out, max_len=c.seq_len, num_filters=c.num_filters)
        return lambda rngs: STU(stu, rngs=rngs)
    if method == "lds":
        return lambda rngs: DiagonalLDS(c.d_in, c.d_out, c.state_dim, 1.0 - c.delta, rngs=rngs)
    if method == "attention":
        widths = dict(d_model=c.attn_d_model, num_heads=c.attn_heads, num_layers=c.attn_layers)
        window = min(c.attn_window or c.seq_len, c.seq_len)
        io = dict(d_input=c.d_in, d_output=c.d_out, max_len=c.seq_len, attention_only=True)
        model = ModelConfig(**widths, **io, window=window)
        return lambda rngs: SpectralModel(model, rngs=rngs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def batched_apply(model: nnx.Module, chunk: int):
    """``x [N, L, d_in] -> model(x)`` as float64 NumPy, compiled once, ``chunk`` rows a call."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def run(x: np.ndarray) -> np.ndarray:
        chunks = [jnp.asarray(x[i : i + chunk]) for i in range(0, len(x), chunk)]
        return np.concatenate([np.asarray(apply(state, c), np.float64) for c in chunks])

    return run


def impulse_response(apply, d_in: int, length: int) -> np.ndarray:
    """Impulse response ``G: [length, d_out, d_in]`` of a causal linear map ``apply`` (``[N, L,
    d_in] -> [N, L, d_out]``), from the unit impulses ``e_i`` at ``t = 0``."""
    impulses = np.zeros((d_in, length, d_in), np.float32)
    impulses[np.arange(d_in), 0, np.arange(d_in)] = 1.0
    return np.transpose(apply(impulses), (1, 2, 0))


def true_impulse_response(task: LDSRegression) -> np.ndarray:
    """``G[t] = C diag(lam^t) B`` of the task's system in float64: ``[L, d_out, d_in]``."""
    lam, b_mat, c_mat = task.system()
    with jax.enable_x64(True):
        powers = np.asarray(lds.impulse_response(jnp.asarray(lam), task.seq_len))
    return np.einsum("tn,on,ni->toi", powers, c_mat, b_mat)


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def heldout_mse(apply, config: ExperimentConfig, noise_std: float, seed: int) -> dict:
    """MSE on ``eval_batches`` held-out batches against the noisy and the clean outputs."""
    noisy, clean = [], []
    for index in range(config.eval_batches):
        rows = range(config.batch)
        batch = config.task(noise_std, seed).batch(seed, index, rows, "eval")
        reference = config.task(0.0, seed).batch(seed, index, rows, "eval")
        prediction = apply(batch.inputs)
        noisy.append(np.mean((prediction - batch.targets) ** 2))
        clean.append(np.mean((prediction - reference.targets) ** 2))
    return {"heldout_mse": float(np.mean(noisy)), "heldout_mse_clean": float(np.mean(clean))}


def run_seed(config: ExperimentConfig, noise_std: float, seed: int) -> dict:
    """Train every method on one system and data stream; curves and identification metrics."""
    task = config.task(noise_std, seed)
    truth = true_impulse_response(task)
    out = {"curves": {}, "seconds": {}, "heldout": {}, "impulse_error": {}}
    out["lag_norms"] = {"true": np.linalg.norm(truth, axis=(1, 2))}
    for method in METHODS:
        print(f"-- {method}, noise_std={noise_std}, seed={seed}", flush=True)
        start = time.perf_counter()
        every = max(1, config.steps // 4)
        schedule = dict(steps=config.steps, seed=seed, log_every=every, eval_batches=0)
        run = TrainConfig(task, optim=config.optim(method), global_batch=config.batch, **schedule)
        result = train(run, model_fn=model_fn(method, config))
        out["seconds"][method] = time.perf_counter() - start
        losses = [r["loss"] for r in result.history if r["split"] == "train"]
        out["curves"][method] = np.array(losses)
        models = {method: result.model}
        if method == "stu":
            models["distilled"] = LDSLayer.from_stu(result.model)
        responses = {}
        for name, model in models.items():
            apply = batched_apply(model, config.eval_chunk)
            out["heldout"][name] = heldout_mse(apply, config, noise_std, seed)
            if name != "attention":
                responses[name] = impulse_response(apply, config.d_in, config.seq_len)
                out["impulse_error"][name] = relative_error(responses[name], truth)
                out["lag_norms"][name] = np.linalg.norm(responses[name] - truth, axis=(1, 2))
        if method == "stu":
            out["distilled_vs_stu"] = relative_error(responses["distilled"], responses["stu"])
    return out


def log_interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric mean and 95% t-interval over axis 0 (seeds), computed on ``log(values)``."""
    logs = np.log(np.maximum(values, np.finfo(np.float64).tiny))
    mean, n = logs.mean(axis=0), values.shape[0]
    half = stats.t.ppf(0.975, n - 1) * logs.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return np.exp(mean), np.exp(mean - half), np.exp(mean + half)


def steps_to_threshold(curves: np.ndarray, floor: float, threshold: float) -> int | None:
    """First step at which the seed-averaged online MSE ``curves: [seeds, steps]``, as a
    running mean over ``max(1, steps // 50)`` steps, is within ``threshold`` of ``floor``."""
    window = max(1, curves.shape[1] // 50)
    cumulative = np.cumsum(np.pad(curves.mean(axis=0), (1, 0)))
    below = np.nonzero((cumulative[window:] - cumulative[:-window]) / window - floor <= threshold)
    return int(below[0][0] + window) if below[0].size else None


def _seed_mean(per_seed: list[dict], *keys) -> float:
    """Mean over seeds of ``run[keys[0]][keys[1]]...``."""
    return float(np.mean([functools.reduce(operator.getitem, keys, run) for run in per_seed]))


def summarize(config: ExperimentConfig, runs: dict) -> tuple[list[dict], dict]:
    """``runs[noise_std] = [run_seed(...) per seed]`` -> (table rows, curve bands)."""
    rows, bands, last = [], {}, max(1, config.steps // 10)
    for noise_std, per_seed in runs.items():
        for method in (*METHODS, "distilled"):
            row = {"noise_std": noise_std, "method": method}
            if method in METHODS:
                curves = np.stack([run["curves"][method] for run in per_seed])
                bands[(noise_std, method)] = (curves, *log_interval(curves))
                final = [
                    float(v[0]) for v in log_interval(curves[:, -last:].mean(1, keepdims=True))
                ]
                row.update(zip(("final_mse", "final_lo95", "final_hi95"), final, strict=True))
                for t in config.thresholds:
                    row[f"steps_to_excess_{t:g}"] = steps_to_threshold(curves, noise_std**2, t)
                row["train_seconds"] = _seed_mean(per_seed, "seconds", method)
            for key in ("heldout_mse", "heldout_mse_clean"):
                row[key] = _seed_mean(per_seed, "heldout", method, key)
            if method != "attention":
                row["impulse_rel_error"] = _seed_mean(per_seed, "impulse_error", method)
            if method == "distilled":
                row["impulse_rel_diff_vs_stu"] = max(run["distilled_vs_stu"] for run in per_seed)
            rows.append(row)
    return rows, bands


def plot(config: ExperimentConfig, bands: dict, lag_norms: dict, path: Path) -> None:
    """One panel per noise level (online MSE: geometric mean and 95% band), and one of the
    impulse responses per lag: ``lag_norms = {"true": ||G[t]||, name: ||G_name[t] - G[t]||}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(config.noise_stds) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    steps = np.arange(1, config.steps + 1)
    for ax, noise_std in zip(axes, config.noise_stds, strict=False):
        for method in METHODS:
            _, mean, lo, hi = bands[(noise_std, method)]
            (line,) = ax.plot(steps, mean, label=method, lw=1.2)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        if noise_std > 0:
            ax.axhline(noise_std**2, color="k", ls=":", lw=1, label="noise floor")
        ax.set(yscale="log", xlabel="step", ylabel="online MSE", title=f"noise std {noise_std:g}")
    colors = {"true": "k", "stu": "C0", "lds": "C1", "distilled": "C3"}
    for name, norms in lag_norms.items():
        label = "||G[t]|| (true)" if name == "true" else f"{name}: ||G[t] - G_true[t]||"
        style = dict(color=colors[name], lw=1, ls="--" if name == "distilled" else "-")
        axes[-1].plot(np.arange(1, norms.size + 1), norms, label=label, **style)
    axes[-1].set(xscale="log", yscale="log", xlabel="lag t + 1", title="impulse response, seed 0")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"symmetric LDS n={config.state_dim}, 1-rho={config.delta:g}, L={config.seq_len}, "
        f"d={config.d_in}, batch {config.batch}: {config.seeds} seeds, 95% band"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict], thresholds: tuple[float, ...]) -> str:
    """The final-MSE table in Markdown."""
    head = ["noise", "method", "final online MSE [95%]", "held-out MSE (clean)", "impulse err"]
    lines = [head + [f"steps to excess < {t:g}" for t in thresholds] + ["train s"]]
    for r in rows:
        if "final_mse" in r:
            final = f"{r['final_mse']:.3g} [{r['final_lo95']:.3g}, {r['final_hi95']:.3g}]"
        else:  # the distilled LDS computes the STU's outputs up to this difference
            final = f"as stu (G differs by {r['impulse_rel_diff_vs_stu']:.1e})"
        cells = [f"{r['noise_std']:g}", r["method"], final]
        cells.append(f"{r['heldout_mse']:.4g} ({r['heldout_mse_clean']:.3g})")
        cells.append(f"{r['impulse_rel_error']:.3g}" if "impulse_rel_error" in r else "-")
        cells += [str(r.get(f"steps_to_excess_{t:g}", "-")) for t in thresholds]
        lines.append([*cells, f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"])
    lines.insert(1, ["---"] * len(lines[0]))
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_outputs(config, runs: dict, rows: list[dict], bands: dict, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    seeds = [f"mse_seed{s}" for s in range(config.seeds)]
    lines = [",".join(["noise_std", "method", "step", "mse_mean", "mse_lo95", "mse_hi95", *seeds])]
    for (noise_std, method), (curves, mean, lo, hi) in bands.items():
        for t in range(config.steps):
            values = ",".join(f"{v:.6g}" for v in (mean[t], lo[t], hi[t], *curves[:, t]))
            lines.append(f"{noise_std},{method},{t + 1},{values}")
    write_text_atomic(out / "curves.csv", "\n".join(lines) + "\n")
    write_text_atomic(out / "final_mse.md", format_table(rows, config.thresholds) + "\n")
    record = {"config": dataclasses.asdict(config), **meta, "rows": rows}
    write_json_atomic(out / "summary.json", record)
    plot(config, bands, next(iter(runs.values()))[0]["lag_norms"], out / "curves.png")


def run_experiment(config: ExperimentConfig, out: Path) -> list[dict]:
    """Every noise level, seed and method; writes the outputs under ``out``; returns the rows."""
    start = time.perf_counter()
    runs = {s: [run_seed(config, s, i) for i in range(config.seeds)] for s in config.noise_stds}
    rows, bands = summarize(config, runs)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    machine["devices"] = [str(d) for d in jax.devices()]
    meta = {"command": " ".join(["python", *sys.argv]), "machine": machine}
    meta["wall_seconds"] = time.perf_counter() - start
    write_outputs(config, runs, rows, bands, out, meta)
    print(format_table(rows, config.thresholds))
    print(f"wrote {out} in {meta['wall_seconds']:.0f} s")
    return rows


def parse_args(argv: list[str] | None) -> tuple[ExperimentConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper", action="store_true", help="the paper's scale (GPU/TPU)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--seeds", type=int, help="number of seeds (systems, inits, data)")
    parser.add_argument("--seq-len", type=int, help="sequence length L")
    parser.add_argument("--d", type=int, help="input and output width d_in = d_out")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "lds_identification")
    args = parser.parse_args(argv)
    changes = {"steps": args.steps, "seeds": args.seeds, "seq_len": args.seq_len}
    changes.update(batch=args.batch, d_in=args.d, d_out=args.d)
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(PAPER if args.paper else ExperimentConfig(), **changes), args.out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    run_experiment(config, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
