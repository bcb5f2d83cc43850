"""Import hygiene, checked on the sources.

* Floors: a package module imports only from its own floor or lower ones (the README's
  repository map), so the folder listing shows the architecture.
* No module reaches into another module's private names (``_name``): tests and experiments
  included. Private means "may change without notice"; what a caller needs gets a public name.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(
    path
    for folder in ("spectral_jax", "tests", "experiments")
    for path in (ROOT / folder).rglob("*.py")
)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(source: str) -> list[str]:
    """``module._name`` and ``from module import _name`` uses in ``source``, as strings."""
    tree = ast.parse(source)
    modules: set[str] = set()  # local names bound to imported modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_private(alias.name.rpartition(".")[2]) or any(
                    _is_private(part) for part in alias.name.split(".")
                ):
                    found.append(f"line {node.lineno}: import {alias.name}")
                modules.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom):
            for part in (node.module or "").split("."):
                if _is_private(part):
                    found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)  # may be a module: checked below
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _is_private(node.attr)
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return sorted(found, key=lambda text: int(text.split()[1].rstrip(":")))


# Lowest first. A module's floor is the first entry whose name prefixes its dotted name: one
# folder per concept, and the base modules beside them.
FLOORS = (
    ("spectral_jax.validation", 0),
    ("spectral_jax.atomic_files", 0),
    ("spectral_jax.ops", 1),
    ("spectral_jax.distill", 2),
    ("spectral_jax.data", 2),
    ("spectral_jax.nn", 3),
    ("spectral_jax.decode", 4),
    ("spectral_jax.interop", 4),
    ("spectral_jax.train", 5),
    ("spectral_jax.apps", 6),
)
PACKAGE = sorted((ROOT / "spectral_jax").rglob("*.py"))


def floor(module: str) -> int:
    for prefix, level in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} has no floor in FLOORS: add it")


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``spectral_jax`` import in the file (``from a import b``
    counts as ``a.b``: ``b`` may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m.startswith("spectral_jax.")]


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_up_a_floor(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    if module == "spectral_jax":
        return
    upward = [
        f"line {line}: {name}"
        for line, name in imported_modules(path)
        if floor(name.rsplit(".", 1)[0] if name.count(".") > 1 else name) > floor(module)
    ]
    assert not upward, f"{module} (floor {floor(module)}) imports from higher floors: {upward}"


def test_the_floor_checker_sees_modules_and_names(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from spectral_jax.train.loop import train\nfrom spectral_jax import apps\n")
    names = [m for _, m in imported_modules(source)]
    assert names == ["spectral_jax.train.loop.train", "spectral_jax.apps"]
    assert (
        floor("spectral_jax.train.loop") > floor("spectral_jax.nn.stu") > floor("spectral_jax.ops")
    )
    assert floor("spectral_jax.distill.report") == floor("spectral_jax.distill")


def test_the_checker_finds_reaches():
    source = "from a import _b\nimport c\nfrom d import e\nc._f()\ne._g\nc.__name__\n"
    assert private_reaches(source) == [
        "line 1: from a import _b",
        "line 4: c._f",
        "line 5: e._g",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_reach_across_modules(path):
    reaches = private_reaches(path.read_text())
    assert not reaches, f"{path.relative_to(ROOT)} uses private names of other modules: {reaches}"


def test_the_package_top_level_holds_only_the_base_and_one_folder_per_concept():
    top = ROOT / "spectral_jax"
    modules = sorted(p.stem for p in top.glob("*.py"))
    folders = sorted(p.name for p in top.iterdir() if (p / "__init__.py").exists())
    assert modules == ["__init__", "atomic_files", "validation"]
    floors = {prefix.removeprefix("spectral_jax.") for prefix, _ in FLOORS}
    assert set(folders) | {"atomic_files", "validation"} == floors
