"""The stages of ``device_check.py``, in the order it runs them (``from device_stages import
STAGES``: the scripts run as ``python experiments/NAME.py``, so this folder is on the path).

A stage is a :class:`Stage`: ``run(ctx)`` measures, hands each row to ``ctx.record`` as soon as
it has it (the check rewrites its JSON then, and :class:`OverBudget` comes back once the stage's
deadline has passed), and returns the stage's note. It raises :class:`Skipped` when it does not
apply (the note says why), :class:`Reinstalled` when it installed jax for the accelerator (the
check re-executes itself), and any other exception when it fails. ``row_keys`` are the keys of
every row it records, the same on a CPU and on an accelerator. The benchmarks are the
functions of the ``bench_*.py`` scripts, called with the sizes below (``tiny``: seconds on a
CPU; full: the sizes of issue 19, for one accelerator).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import bench_decode_layer
import bench_decode_model
import bench_filters
import bench_lds_prefill
import bench_stu
import bench_train
import decode_bench_common
import jax
import jax.numpy as jnp

from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.nn.distillation import distill_model
from spectral_jax.train.flops import peak_flops

REPO = Path(__file__).resolve().parent.parent
REEXEC_ENV = "SPECTRAL_JAX_DEVICE_CHECK_REEXEC"  # set when the check re-executed after install
# Every tiny LDS (layer decode to 2^9, model decode 256 + 256, prefill) is fitted at this
# length, so that one bank fit (seconds, cached) serves them all.
TINY_LEN = 2**9
# Full sizes of the stages that distill (each fits an LDS bank at its longest length).
LAYER_EXPONENTS = (10, 12, 14, 16, 18, 20)
MODEL_NEW = 2048
PREFILL_CONTEXTS = (8192, 32768, 131072)
DECODE_STRATEGIES = ("lds", "futurefill", "naive")  # the headline first: a cut keeps it
DECODE_KEYS = ("mode", "strategy", "context", "tokens", "seconds", "tokens_per_second",
               "prefill_seconds", "compile_seconds", "cache_bytes", "model", "batch")  # fmt: skip


class OverBudget(Exception):
    """The stage's deadline has passed (raised by :meth:`StageRun.record`)."""


class Skipped(Exception):
    """The stage does not apply here; the message says why."""


class Reinstalled(Exception):
    """jax for the accelerator was installed: the check must re-execute itself to load it."""


class StageRun:
    """What a running stage gets: the sizes (``tiny``), whether the CPU is forced (``cpu``), its
    wall-clock ``deadline`` (``time.time()``) and ``record``."""

    def __init__(
        self, tiny: bool, cpu: bool, deadline: float, save: Callable[[list[dict]], None]
    ) -> None:
        self.tiny, self.cpu, self.deadline = tiny, cpu, deadline
        self.rows: list[dict] = []
        self.save = save

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.time()

    def record(self, row: dict) -> None:
        """Add ``row`` and save; raise :class:`OverBudget` past the deadline."""
        if row:
            self.rows.append(row)
            self.save(self.rows)
        if self.left() <= 0:
            raise OverBudget


class Stage(NamedTuple):
    """One stage: ``budget_s`` (full sizes) and ``tiny_budget_s`` are its wall-time budgets;
    it is skipped when less than a quarter of its budget is left of the run's."""

    name: str
    run: Callable[[StageRun], str]
    budget_s: float
    tiny_budget_s: float
    row_keys: tuple[str, ...]


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


# ---- environment and install -------------------------------------------------------------------


def environment(ctx: StageRun) -> str:
    """One row per device; fails if x64 is on (every benchmark assumes float32 defaults)."""
    for d in jax.devices():
        ctx.record({"id": d.id, "platform": d.platform, "device_kind": d.device_kind})
    if jnp.asarray(0.0).dtype != jnp.float32:
        raise RuntimeError("jax_enable_x64 is on: unset JAX_ENABLE_X64 and run again")
    return f"backend {jax.default_backend()}, {jax.device_count()} device(s), x64 off"


PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "libtpu")  # fmt: skip


def installed() -> list[dict]:
    """``{"package", "version"}`` of the jax distributions installed in this interpreter."""
    rows = []
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            rows.append({"package": name, "version": importlib.metadata.version(name)})
    return rows


def accelerator_extra() -> str | None:
    """The project's install extra this host's hardware needs: ``cuda12`` where an NVIDIA
    driver is present, ``tpu`` on a TPU VM, None elsewhere."""
    if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists():
        return "cuda12"
    if any(Path("/dev").glob("accel[0-9]*")) or any(Path("/dev/vfio").glob("[0-9]*")):
        return "tpu"
    return None


def install(ctx: StageRun) -> str:
    """Install ``.[cuda12]`` / ``.[tpu]`` where the host has an accelerator that jax does not
    use yet, then ask for a re-execution; after it, check that jax uses the accelerator."""
    for row in installed():
        ctx.record(row)
    if ctx.cpu:
        raise Skipped("--cpu: nothing to install")
    backend = jax.default_backend()
    if os.environ.get(REEXEC_ENV):
        if backend == "cpu":
            raise RuntimeError(f"{os.environ[REEXEC_ENV]}, but jax still sees only the CPU")
        return f"{os.environ[REEXEC_ENV]}; jax {jax.__version__} now runs on {backend}"
    if backend != "cpu":
        return f"jax {jax.__version__} already runs on {backend}: nothing to install"
    extra = accelerator_extra()
    if extra is None:
        raise Skipped("no accelerator on this host (no nvidia-smi, /dev/nvidia0, /dev/accel*)")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--retries", "1"]
    command += ["-e", f".[{extra}]"]
    subprocess.run(command, cwd=REPO, check=True, timeout=max(ctx.left(), 1.0))
    raise Reinstalled(f"installed .[{extra}] with {sys.executable} -m pip")


# ---- tests ---------------------------------------------------------------------------------------

GENERATE = "tests/test_generate.py::"
# (node id, assumes_f32_matmul): the device's numerics (FFT, matmul precision, compensated
# arithmetic) and decode equivalences, about 100 s of CPU time on 2 cores. assumes_f32_matmul: a
# float32 test whose tolerance is derived for float32 matmul rounding, which a TF32 or bf16-pass
# default would exceed (float64 tests are unaffected: TF32 applies to float32 only). Not here:
# tests/test_sharding.py's sharded step forces 8 CPU devices (JAX_PLATFORMS=cpu) whatever the
# host has, and the float64 microbatch step is host arithmetic; both run in the CPU suite.
TESTS = (
    ("tests/test_stu.py::test_stu_matches_direct_formula_float64", False),
    ("tests/test_stu.py::test_stu_float32_and_jit_grad", True),
    ("tests/test_conv.py::test_causal_conv_matches_direct_float64", False),
    ("tests/test_conv.py::test_causal_conv_float32_and_bfloat16", True),
    ("tests/test_conv.py::test_causal_conv_project_matches_direct_float64", False),
    ("tests/test_lds.py::test_error_free_transformations_are_exact", False),
    ("tests/test_lds.py::test_compensated_paths_match_float64", True),
    ("tests/test_lds.py::test_compensated_readout_survives_cancellation", True),
    (
        "tests/test_lds_layer.py::test_distilled_layer_matches_float64_stu[tensordot-standard]",
        False,
    ),
    ("tests/test_lds_layer.py::test_fft_prefill_equals_scans_and_steps_float32", True),
    ("tests/test_lds_layer.py::test_steps_from_init_cache_reproduce_call_float32", True),
    ("tests/test_stu_decode.py::test_prefill_and_steps_match_forward_float64", False),
    ("tests/test_stu_decode.py::test_prefill_and_steps_match_forward_float32_default_blocks", True),
    (GENERATE + "test_greedy_tokens_agree_across_strategies_and_with_teacher_forcing", True),
    (GENERATE + "test_distilled_model_decodes_like_the_stu_model_and_greedy_tokens_match", True),
    (GENERATE + "test_float32_steps_match_forward", True),
)
TINY_TESTS = (("tests/test_conv.py::test_causal_conv_is_causal", False),)
OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def tests(ctx: StageRun) -> str:
    """The accelerator-relevant tests in a ``pytest`` subprocess under
    ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (allocating as it goes: the check itself holds
    jax's preallocated share of the device): one row per test node as pytest reports it."""
    chosen = TINY_TESTS if ctx.tiny else TESTS
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONPATH": str(REPO)}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process holds most of the memory
    if ctx.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    command += [node for node, _ in chosen]
    cut = False
    try:
        out = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(ctx.left(), 1)
        ).stdout
    except subprocess.TimeoutExpired as err:  # the output so far (bytes on POSIX)
        out, cut = err.stdout or "", True
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    for node, outcome in OUTCOME.findall(out):
        f32 = next(flag for prefix, flag in chosen if node.startswith(prefix))
        ctx.rows.append({"test": node, "outcome": outcome.lower(), "assumes_f32_matmul": f32})
    ctx.save(ctx.rows)
    counts = Counter(row["outcome"] for row in ctx.rows)
    note = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no test ran"
    note += " (JAX_DEFAULT_MATMUL_PRECISION=highest)"
    if cut:
        raise RuntimeError(f"pytest cut at the stage's budget: {note}")
    if counts["failed"] or counts["error"] or not ctx.rows:
        raise RuntimeError(f"{note}; rerun the failed ones with pytest to see why")
    return note


# ---- banks fitted ahead --------------------------------------------------------------------------


def full_bank_lengths() -> tuple[int, ...]:
    """The lengths at which the full-size stages fit their LDS banks (K = 24, standard, 120
    states, plain): the layer decode's 2^20, the model decode's longest context plus its new
    tokens, the prefill's longest prompt."""
    model_len = max(bench_decode_model.CONTEXTS) + MODEL_NEW
    return (2 ** max(LAYER_EXPONENTS), model_len, max(PREFILL_CONTEXTS))


def prefit_banks(directory: Path) -> list[Path]:
    """Fit the full-size stages' banks on this host (minutes on a CPU: a cold fit at 2^20
    dominates) and copy their cache files, small, into ``directory``: a device host run with
    ``SPECTRAL_JAX_CACHE=directory`` reads them instead of fitting. The filters computed on the
    way (hundreds of MB at 2^20, seconds to recompute) stay behind in a temporary folder."""
    directory.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("SPECTRAL_JAX_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPECTRAL_JAX_CACHE"] = tmp
        try:
            for L in full_bank_lengths():
                start = time.time()
                fit_lds_bank(L, decode_bench_common.K, "standard", 120, arithmetic="plain")
                print(f"fitted the bank at L={L} in {time.time() - start:.0f} s", flush=True)
        finally:
            restore_env("SPECTRAL_JAX_CACHE", before)
        return [Path(shutil.copy2(f, directory)) for f in sorted(Path(tmp).glob("ldsbank-*"))]


# ---- benchmarks ----------------------------------------------------------------------------------


def stu(ctx: StageRun) -> str:
    """STU forward and forward+backward, float32, tensordot then full (bench_stu)."""
    B, L, d, K, repeats = (1, 128, 16, 8, 1) if ctx.tiny else (1, 8192, 1024, 24, 5)
    errors = []
    for mode in ("tensordot", "full"):
        try:
            ctx.record(bench_stu.time_layer(mode, B, L, d, K, repeats))
        except jax.errors.JaxRuntimeError as err:  # e.g. the full projection out of memory
            errors.append(f"{mode}: {first_line(err)}")
    if not ctx.rows:
        raise RuntimeError("; ".join(errors))
    cells = [f"{r['mode']} fwd+bwd {1e3 * r['fwdbwd_s']:.2f} ms" for r in ctx.rows]
    return ", ".join(cells + errors) + f" (B={B} L={L} d={d} K={K}, median of {repeats})"


def restore_env(name: str, value: str | None) -> None:
    """Set ``name`` back to ``value`` (None: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def filter_cache_off() -> Iterator[None]:
    """Time the filters' computation, not their disk cache (SPECTRAL_JAX_CACHE restored)."""
    before = os.environ.get("SPECTRAL_JAX_CACHE")
    os.environ["SPECTRAL_JAX_CACHE"] = "off"
    try:
        yield
    finally:
        restore_env("SPECTRAL_JAX_CACHE", before)


def filters(ctx: StageRun) -> str:
    """Cold spectral filters, K = 24 (bench_filters; computed on the host)."""
    lengths = [2**12] if ctx.tiny else [2**16, 2**20]
    with filter_cache_off():
        for L in lengths:
            seconds, _, _ = bench_filters.time_fast(L)
            ctx.record({"L": L, "K": bench_filters.K, "seconds": seconds})
    return ", ".join(f"L=2^{r['L'].bit_length() - 1} {r['seconds']:.2f} s" for r in ctx.rows)


def decode_summary(rows: list[dict]) -> str:
    best = {}
    for r in rows:  # the longest context each strategy reached
        if r["context"] >= best.get(r["strategy"], {"context": 0})["context"]:
            best[r["strategy"]] = r
    return ", ".join(
        f"{s} {r['tokens_per_second']:.0f} tok/s at 2^{r['context'].bit_length() - 1}"
        for s, r in best.items()
    )


def decode_layer(ctx: StageRun) -> str:
    """One layer decoding 2^8 and 2^9 (tiny) or 2^10, 2^12, .., 2^20 tokens
    (bench_decode_layer); a strategy stops where one run is predicted over 40 s (tiny: 5 s)."""
    exponents = (8, TINY_LEN.bit_length() - 1) if ctx.tiny else LAYER_EXPONENTS
    args = argparse.Namespace(
        quick=False, exponents=exponents, strategies=DECODE_STRATEGIES,
        budget=min(5.0 if ctx.tiny else 40.0, ctx.left()), lds_arithmetic=None,
    )  # fmt: skip
    bench_decode_layer.bench(args, ctx.record)
    return decode_summary(ctx.rows) + f" (one run predicted over {args.budget:.0f} s: stop)"


def decode_model(ctx: StageRun) -> str:
    """The 4-layer STU tensordot model at batch 1 (bench_decode_model): context 256 and 256 new
    tokens (tiny), or 1k..128k (2^20 for lds) and 2048 new tokens."""
    args = argparse.Namespace(
        quick=ctx.tiny, models=["stu_tensordot"], batches=[1],
        new=TINY_LEN - 256 if ctx.tiny else MODEL_NEW,  # after --quick's one context of 256
        repeats=1 if ctx.tiny else 3, strategies=DECODE_STRATEGIES,
        budget=min(5.0 if ctx.tiny else 30.0, ctx.left()), lds_arithmetic=None,
    )  # fmt: skip
    bench_decode_model.bench(args, ctx.record)
    return decode_summary(ctx.rows)


def train(ctx: StageRun) -> str:
    """One hybrid (STU + sliding-window attention) training run in bf16 (bench_train)."""
    L, batch, d, steps = (128, 2, 32, 2) if ctx.tiny else (8192, 8, 1024, 6)
    row = bench_train.measure("hybrid", L, batch, steps, d_model=d, dtype="bfloat16")
    ctx.record(row)
    peak = peak_flops(jax.devices()[0].device_kind)
    mfu = "no MFU: no peak known" if row["mfu"] is None else f"MFU {100 * row['mfu']:.1f}%"
    return f"{row['tokens_per_s']:,.0f} tok/s, {mfu} (peak {peak or '-'} FLOP/s, {steps} steps)"


def prefill(ctx: StageRun) -> str:
    """The distilled model's prefill against the STU model's (bench_lds_prefill)."""
    contexts, repeats = ([TINY_LEN], 1) if ctx.tiny else (PREFILL_CONTEXTS, 3)
    model = bench_lds_prefill.spectral_model(max(contexts))
    distilled = distill_model(model).model
    for context in contexts:
        ctx.record(bench_lds_prefill.prefill_row(model, distilled, context, repeats, False))
    return ", ".join(f"{r['context']}: lds/stu {r['ratio']:.2f}x" for r in ctx.rows)


TRAIN_KEYS = ("model", "d_model", "dtype", "L", "batch", "remat", "microbatches", "tokens_per_s",
              "tokens_per_s_per_device", "mfu", "step_s")  # fmt: skip
STAGES = (
    Stage("environment", environment, 30, 2, ("id", "platform", "device_kind")),
    Stage("install", install, 180, 5, ("package", "version")),
    Stage("tests", tests, 180, 60, ("test", "outcome", "assumes_f32_matmul")),
    Stage("stu", stu, 45, 20, ("mode", "B", "L", "d", "K", "fwd_s", "fwdbwd_s")),
    Stage("filters", filters, 20, 10, ("L", "K", "seconds")),
    Stage("decode_layer", decode_layer, 90, 30, DECODE_KEYS),
    Stage("decode_model", decode_model, 90, 30, DECODE_KEYS),
    Stage("train", train, 60, 30, TRAIN_KEYS),
    Stage("prefill", prefill, 40, 20, ("context", "stu_s", "lds_s", "ratio")),
)
