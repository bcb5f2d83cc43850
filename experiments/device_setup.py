"""The stages of ``device_check.py`` that check the host before it measures: the environment
(devices, x64 off), the install of jax for the accelerator, and the accelerator-relevant tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
from device_run import Reinstalled, Skipped, StageRun

REPO = Path(__file__).resolve().parent.parent
REEXEC_ENV = "SPECTRAL_JAX_DEVICE_CHECK_REEXEC"  # set when the check re-executed after install


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
    # tests/conftest.py lowers XLA's backend optimisation for the CPU suite's speed unless a level
    # is set: on the device, test the code that users run (XLA's default level, 3)
    if "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=3"
        ).strip()
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
