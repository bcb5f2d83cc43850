"""Shared test setup.

* The on-disk filter/bank cache: one directory for the whole run (every pytest-xdist worker
  included; writes are atomic), so a filter or LDS bank is computed once and read by every test
  after. Tests of the cache itself take ``private_cache``: an empty directory of their own.
* XLA's persistent compilation cache, in one directory for the run (workers and the
  subprocesses that tests start inherit it through the environment): a program that another
  test, worker or process already compiled is loaded, not compiled again.
* XLA compiles with ``--xla_backend_optimization_level=0`` unless ``XLA_FLAGS`` sets a level.
* Threads: under pytest-xdist each worker gets its share of the CPUs for OpenBLAS (numpy's
  linear algebra), set before numpy is imported; workers that each spin up a thread per core
  would oversubscribe the machine. A value set in the environment is kept.
* :func:`randomize_ar_output`, for tests that need the output AR recursion to do something.
* :data:`TINY_LM`: ``--set`` overrides that shrink an LM preset to a 2-step, 2-layer model.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run: make it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spectral_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # cache every program
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # XLA's LLVM backend unoptimized: the tests' tiny programs cost ~30% less CPU (measured on
    # test_generate + test_model). The HLO programs are the same; only their machine code is
    # less optimized (no fast-math either way), so results agree to round-off.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # an xdist worker (the controller runs no test)
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, str(max(1, share)))

import jax
import pytest
from flax import nnx

from spectral_jax.ops import disk_cache, filters

TINY_LM = [
    "steps=2",
    "model.d_model=16",
    "model.max_len=64",
    "task.seq_len=64",
    "model.window=16",
    "model.num_filters=8",
    "model.num_layers=2",
]


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory, worker_id):
    """The run's cache directory: beside the workers' own temporary directories under xdist
    (``worker_id`` is ``"master"`` without it), so that all workers share it."""
    base = tmp_path_factory.getbasetemp()
    return (base if worker_id == "master" else base.parent) / "spectral_jax_cache"


@pytest.fixture(autouse=True)
def shared_cache(shared_cache_dir, monkeypatch):
    """Point the on-disk cache at the run's shared directory."""
    monkeypatch.setenv(disk_cache.ENV_VAR, str(shared_cache_dir))
    return shared_cache_dir


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """For tests of the cache: a per-test, empty cache directory and an empty in-memory filter
    cache (cleared again afterwards, so no other test sees what this one put there)."""
    monkeypatch.setenv(disk_cache.ENV_VAR, str(tmp_path / "cache"))
    filters.clear_memory_cache()
    yield tmp_path / "cache"
    filters.clear_memory_cache()


def randomize_ar_output(module: nnx.Module, key: jax.Array) -> nnx.Module:
    """Set every ``M_y`` in ``module`` (itself or a submodule) to ``0.2 * N(0, 1)`` in its dtype,
    one key split per layer, and return the module. ``M_y`` is zero at init, so the output AR
    recursion would otherwise do nothing; the small gain keeps it stable."""
    for _, layer in nnx.iter_modules(module):
        if hasattr(layer, "M_y"):
            key, sub = jax.random.split(key)
            layer.M_y[...] = 0.2 * jax.random.normal(sub, layer.M_y.shape, layer.M_y.dtype)
    return module
