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

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
META_KEYS = {"date", "argv", "tiny", "partial", "device", "versions", "budgets"}
STAGE_KEYS = {"status", "seconds", "budget_s", "note", "rows"}


@pytest.fixture
def check(monkeypatch):
    """The script as a module (its folder on the path, as when it runs) and its stages."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main sets it: restored after the test
    return importlib.import_module("device_check"), importlib.import_module("device_stages")


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
