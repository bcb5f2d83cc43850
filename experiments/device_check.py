"""One prepared accelerator check: environment, install, tests and quick benchmarks, in one run.

Runs the stages of :mod:`device_stages` in order (environment, install, tests, stu, filters,
decode_layer, decode_model, train, prefill; what a stage gets and raises: :mod:`device_run`),
each within its wall-time budget and the run's (``--budget``, default 480 s, install and
compilation included). A stage that would start with less than a quarter of its budget left
is skipped with a note; a stage past its deadline stops at its next row. The JSON is
rewritten atomically after every row and every stage, so a run cut short (or killed) keeps
every figure it measured.

``--cpu`` forces the CPU backend (and skips the install); ``--tiny`` runs the same stages at
sizes that take seconds on a CPU (the suite runs ``--cpu --tiny``, about 30 s on two cores,
with XLA's expensive LLVM passes off: those runs are compile-bound, their figures check the
path, not the speed). On a host with an
accelerator that jax does not use yet, the install stage runs
``python -m pip install -e '.[cuda12]'`` (or ``.[tpu]``) into the running interpreter and the
check re-executes itself, keeping its clock.

JSON (``--json``, default ``results/device/<device-kind-slug>[-tiny].json``), the same keys on
every device::

    {"meta": {"date": ISO-8601 UTC start, "argv": [...], "tiny": bool, "partial": bool,
              "device": {"kind", "platform", "count"},
              "versions": {"python", "jax", "jaxlib", "flax", "optax", "numpy",
                           "plugins": {name: version}},
              "budgets": {"total_s", "stages": {name: seconds}}},
     "stages": {name: {"status": "ok" | "skipped" | "failed", "seconds", "budget_s", "note",
                       "rows": [...]}}}

``meta.partial`` is true until the run ends. Every stage is present from the start: one not
reached yet is ``skipped`` ("not reached"), one running is ``failed`` ("cut ...") until it
ends. Each stage's rows have the keys ``device_stages.STAGES[i].row_keys``: environment one
per device, install one per jax distribution, tests one per pytest node (its outcome and
whether its tolerance assumes float32 matmuls), and the benchmarks the rows of the
``bench_*.py`` function they call. The table printed at the end has one line per stage.

``--stages NAME ...`` runs only those (a retry of the ones that failed; the others are
``skipped``, "not chosen").

``--prefit-banks DIR`` only fits the LDS banks of the full-size stages (minutes on a CPU: a
cold fit at L = 2^20 dominates) and copies their small cache files into ``DIR``: fit them on
a CPU host, take ``DIR`` along, and run the check there with ``SPECTRAL_JAX_CACHE=DIR`` so the
device's minutes are not spent fitting.

Usage: python experiments/device_check.py [--cpu] [--tiny] [--budget S] [--json PATH]
       [--stages NAME ...]
       python experiments/device_check.py --prefit-banks DIR
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

from spectral_jax.atomic_files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0
START_ENV = "SPECTRAL_JAX_DEVICE_CHECK_START"  # the first run's time.time(), across re-execs
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true"  # halves CPU compile times
CORE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="force the CPU backend, no install")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU)")
    parser.add_argument("--budget", type=float, help=f"total seconds (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--json", type=Path, help="the JSON to write (default: results/device/)")
    parser.add_argument("--stages", nargs="+", metavar="NAME", help="run only these (a retry)")
    parser.add_argument(
        "--prefit-banks", type=Path, metavar="DIR", help="only fit the full-size LDS banks into DIR"
    )
    return parser.parse_args(argv)


def slug(device_kind: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


def versions() -> dict:
    """Python's and the main packages' versions; ``plugins``: the accelerator jax plugins."""
    import device_setup

    found = {r["package"]: r["version"] for r in device_setup.installed()}
    core = {name: importlib.metadata.version(name) for name in CORE_PACKAGES}
    plugins = {name: v for name, v in found.items() if name not in core}
    return {"python": platform.python_version(), **core, "plugins": plugins}


def pending(budget_s: float) -> dict:
    """A stage's entry before it runs."""
    note = "not reached (the run stopped before it)"
    return {"status": "skipped", "seconds": 0.0, "budget_s": budget_s, "note": note, "rows": []}


def table(doc: dict) -> str:
    lines = [f"{'stage':<14}{'status':<9}{'seconds':>8}{'rows':>6}  note"]
    for name, s in doc["stages"].items():
        lines.append(
            f"{name:<14}{s['status']:<9}{s['seconds']:>8.1f}{len(s['rows']):>6}  {s['note']}"
        )
    return "\n".join(lines)


def default_json(device_kind: str, tiny: bool) -> Path:
    """``results/device/<device-kind-slug>[-tiny].json``."""
    return REPO / "results" / "device" / f"{slug(device_kind)}{'-tiny' if tiny else ''}.json"


def run_stage(stage, ctx) -> tuple[str, str]:
    """``(status, note)`` of running ``stage`` (a ``device_run.Stage``) with ``ctx``; raises
    ``Reinstalled`` on, for the caller to re-execute."""
    from device_run import OverBudget, Reinstalled, Skipped, first_line

    try:
        return "ok", stage.run(ctx)
    except OverBudget:
        return "ok", f"cut at its budget after {len(ctx.rows)} row(s)"
    except Skipped as err:
        return "skipped", str(err)
    except Reinstalled:
        raise
    except Exception as err:  # the next stages still run
        traceback.print_exc()
        return "failed", first_line(err)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when no stage failed, else 1."""
    start = float(os.environ.get(START_ENV) or time.time())  # the budget counts from here
    args = parse(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.cpu and args.tiny:  # tiny runs are compile-bound: skip LLVM's expensive passes
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    import device_stages as ds  # imports jax: after JAX_PLATFORMS is set
    import jax
    from device_run import Reinstalled, StageRun
    from device_setup import REEXEC_ENV

    if args.prefit_banks:
        for path in ds.prefit_banks(args.prefit_banks):
            print(f"wrote {path}")
        return 0
    names = [s.name for s in ds.STAGES]
    unknown = sorted(set(args.stages or ()) - set(names))
    if unknown:
        raise SystemExit(f"--stages: no stage {', '.join(unknown)}; the stages: {', '.join(names)}")
    device, tiny = jax.devices()[0], args.tiny
    budgets = {s.name: s.tiny_budget_s if tiny else s.budget_s for s in ds.STAGES}
    total = DEFAULT_BUDGET_S if args.budget is None else args.budget
    if args.budget is None and device.platform == "cpu" and tiny:
        total = sum(budgets.values())
    path = args.json or default_json(device.device_kind, tiny)
    doc = {
        "meta": {
            "date": datetime.datetime.fromtimestamp(start, datetime.UTC).isoformat(),
            "argv": sys.argv if argv is None else [str(Path(__file__).resolve()), *argv],
            "tiny": tiny,
            "partial": True,
            "device": {
                "kind": device.device_kind,
                "platform": device.platform,
                "count": jax.device_count(),
            },
            "versions": versions(),
            "budgets": {"total_s": total, "stages": budgets},
        },
        "stages": {name: pending(budgets[name]) for name in names},
    }
    print(f"device check: {device.device_kind} ({device.platform}), budget {total:.0f} s")
    write_json_atomic(path, doc)
    for stage in ds.STAGES:
        left = start + total - time.time()
        entry = doc["stages"][stage.name]
        if args.stages and stage.name not in args.stages:
            entry["note"] = "not chosen (--stages)"
        elif left < budgets[stage.name] / 4:
            entry["note"] = f"skipped: {max(left, 0):.0f} s of the run's budget left, under a "
            entry["note"] += f"quarter of its {budgets[stage.name]:.0f} s"
        else:
            began = time.time()

            def save(rows: list[dict], entry=entry, began=began) -> None:
                entry.update(status="failed", seconds=time.time() - began, rows=rows,
                             note="cut: the run stopped during this stage")  # fmt: skip
                write_json_atomic(path, doc)

            ctx = StageRun(tiny, args.cpu, began + min(budgets[stage.name], left), save)
            save([])
            print(f"--- {stage.name} (budget {ctx.left():.0f} s)", flush=True)
            try:
                status, note = run_stage(stage, ctx)
            except Reinstalled as err:  # load the new jax: same argv, same clock
                entry.update(status="ok", seconds=time.time() - began, note=str(err))
                write_json_atomic(path, doc)
                os.environ.update({START_ENV: str(start), REEXEC_ENV: str(err)})
                os.execv(sys.executable, [sys.executable, *doc["meta"]["argv"]])
            entry.update(status=status, seconds=time.time() - began, rows=ctx.rows, note=note)
        write_json_atomic(path, doc)
    doc["meta"]["partial"] = False
    write_json_atomic(path, doc)
    print(table(doc))
    print(f"wrote {path}")
    return int(any(e["status"] == "failed" for e in doc["stages"].values()))


if __name__ == "__main__":
    sys.exit(main())
