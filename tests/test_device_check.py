"""The accelerator check (experiments/device_check.py) on the CPU at its tiny sizes: every stage
runs and writes the documented JSON, and a run cut by its budget still leaves a complete one.

The full run is a subprocess, as ``make device-check`` runs it (its XLA flags must be set before
jax starts); the cut run only starts jax, so it runs in this process."""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
META_KEYS = {"date", "argv", "tiny", "partial", "device", "versions", "budgets"}
STAGE_KEYS = {"status", "seconds", "budget_s", "note", "rows"}


@pytest.fixture
def check(monkeypatch):
    """The script and its stage modules (their folder on the path, as when it runs)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main sets it: restored after the test
    return importlib.import_module("device_check"), importlib.import_module("device_stages")


@pytest.fixture
def host_stages(check):
    """The environment / install / tests stages and what a stage gets (device_run)."""
    return importlib.import_module("device_setup"), importlib.import_module("device_run")


def check_schema(doc: dict, stages) -> None:
    meta = doc["meta"]
    assert set(meta) == META_KEYS and meta["tiny"] is True and meta["partial"] is False
    assert set(meta["device"]) == {"kind", "platform", "count"}
    assert meta["device"]["platform"] == "cpu" and meta["device"]["count"] >= 1
    versions = meta["versions"]
    assert {"python", "jax", "jaxlib", "flax", "optax", "numpy", "plugins"} == set(versions)
    assert set(meta["budgets"]) == {"total_s", "stages"}
    assert list(doc["stages"]) == [s.name for s in stages.STAGES]
    assert list(meta["budgets"]["stages"]) == [s.name for s in stages.STAGES]
    for stage in stages.STAGES:
        entry = doc["stages"][stage.name]
        assert set(entry) == STAGE_KEYS, stage.name
        assert entry["status"] in ("ok", "skipped", "failed") and entry["note"], stage.name
        assert entry["seconds"] >= 0 and entry["budget_s"] > 0
        for row in entry["rows"]:
            assert set(row) == set(stage.row_keys), (stage.name, row)


def test_tiny_cpu_run_writes_every_stage(check, tmp_path):
    _, stages = check
    path = tmp_path / "x.json"
    command = [sys.executable, "experiments/device_check.py", "--cpu", "--tiny", "--json", path]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads(path.read_text())
    check_schema(doc, stages)
    status = {name: entry["status"] for name, entry in doc["stages"].items()}
    assert status.pop("install") == "skipped"  # --cpu installs nothing
    assert set(status.values()) == {"ok"}, doc["stages"]
    for name, entry in doc["stages"].items():
        assert entry["rows"] or name == "install", name
    assert all(r["outcome"] == "passed" for r in doc["stages"]["tests"]["rows"])
    strategies = {r["strategy"] for r in doc["stages"]["decode_layer"]["rows"]}
    assert strategies == {"naive", "futurefill", "lds"}
    assert all(f"\n{name} " in run.stdout for name in doc["stages"])  # the table


def test_a_cut_run_marks_the_stages_it_skipped(check, tmp_path):
    device_check, stages = check
    path = tmp_path / "cut.json"
    # 2 s: the environment stage (a quarter of its 2 s needed to start) runs, then at most the
    # install (skipped either way under --cpu), and every later stage is skipped for time.
    assert device_check.main(["--cpu", "--tiny", "--budget", "2", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    check_schema(doc, stages)
    assert doc["stages"]["environment"]["status"] == "ok"
    assert doc["stages"]["environment"]["rows"][0]["platform"] == "cpu"
    assert doc["stages"]["install"]["status"] == "skipped"
    for name in [s.name for s in stages.STAGES][2:]:
        entry = doc["stages"][name]
        assert entry["status"] == "skipped" and entry["note"].startswith("skipped:"), name
        assert entry["rows"] == [] and entry["seconds"] == 0


def test_the_device_kind_names_the_default_json(check):
    device_check, _ = check
    assert device_check.slug("NVIDIA H200") == "nvidia-h200"
    assert device_check.slug("TPU v5 lite") == "tpu-v5-lite"


def test_install_asks_for_the_extra_the_hardware_needs_and_a_reexec(host_stages, monkeypatch):
    """On a host whose jax sees only the CPU: no accelerator -> skipped; an NVIDIA driver ->
    pip installs ``.[cuda12]`` into this interpreter and the check is asked to re-execute;
    after the re-execution, a jax still on the CPU is a failure that says so."""
    stages, run = host_stages
    ctx = run.StageRun(tiny=True, cpu=False, deadline=time.time() + 60, save=lambda rows: None)
    monkeypatch.setattr(stages, "accelerator_extra", lambda: None)
    with pytest.raises(run.Skipped, match="no accelerator"):
        stages.install(ctx)
    commands = []
    monkeypatch.setattr(stages, "accelerator_extra", lambda: "cuda12")
    monkeypatch.setattr(stages.subprocess, "run", lambda command, **kw: commands.append(command))
    with pytest.raises(run.Reinstalled, match=r"\.\[cuda12\]"):
        stages.install(ctx)
    assert commands[0][:4] == [sys.executable, "-m", "pip", "install"]
    assert commands[0][-2:] == ["-e", ".[cuda12]"]
    monkeypatch.setenv(stages.REEXEC_ENV, "installed .[cuda12]")
    with pytest.raises(RuntimeError, match="still sees only the CPU"):
        stages.install(ctx)
    assert {row["package"] for row in ctx.rows} >= {"jax", "jaxlib"}


def test_prefit_copies_only_the_bank_files(check, tmp_path, monkeypatch):
    """Each full-size length is fitted as ``LDSLayer.from_stu`` fits it, into a temporary cache;
    only the bank files reach the folder (the filters stay behind), and the cache variable is
    restored."""
    _, stages = check
    calls = []

    def fake_fit(L, K, variant, num_states, arithmetic):
        calls.append((L, K, variant, num_states, arithmetic))
        cache = pathlib.Path(os.environ["SPECTRAL_JAX_CACHE"])
        (cache / f"ldsbank-{variant}-L{L}.npz").write_bytes(b"bank")
        (cache / f"filters-L{L}.npz").write_bytes(b"filters")

    monkeypatch.setenv("SPECTRAL_JAX_CACHE", str(tmp_path / "mine"))
    monkeypatch.setattr(stages, "fit_lds_bank", fake_fit)
    written = stages.prefit_banks(tmp_path / "banks")
    lengths = stages.full_bank_lengths()
    assert lengths[0] == 2**20 and calls == [(L, 24, "standard", 120, "plain") for L in lengths]
    assert sorted(p.name for p in (tmp_path / "banks").iterdir()) == sorted(
        f"ldsbank-standard-L{L}.npz" for L in lengths
    )
    assert sorted(written) == sorted((tmp_path / "banks").iterdir())
    assert os.environ["SPECTRAL_JAX_CACHE"] == str(tmp_path / "mine")
