"""No module reaches into another module's private names (``_name``): tests and experiments
included. Private means "may change without notice"; what a caller needs gets a public name."""

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
