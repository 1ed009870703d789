"""The packages stand on each other in one direction only.

models/ is the contract at the ground, appliance/ stands on it, training/
and export/ stand on both (export may also use training's run loading).
An import that points up a floor, or sideways into a package that is not
below, fails here with the file and line, so the plan cannot drift back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = {"models": 0, "appliance": 1, "training": 2, "export": 3}


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every absolute import in the source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(package: str, source: str, where: str) -> list[str]:
    floor = FLOOR[package]
    return [
        f"{where}:{line} imports {target} (floor {FLOOR[target]}) from {package} (floor {floor})"
        for line, target in imported_packages(source)
        if target in FLOOR and target != package and FLOOR[target] >= floor
    ]


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_imports_only_point_down(package):
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        where = str(path.relative_to(ROOT))
        problems += upward_imports(package, path.read_text(encoding="utf-8"), where)
    assert not problems, "imports that run up the layers:\n" + "\n".join(problems)


def test_an_upward_import_is_caught():
    source = "import os\nfrom export.build_bundle import export_bundle\n"
    assert upward_imports("appliance", source, "appliance/x.py") == [
        "appliance/x.py:2 imports export (floor 3) from appliance (floor 1)"
    ]
    assert upward_imports("training", "import appliance.runtime\n", "t.py") == []
    assert upward_imports("models", "from appliance import errors\n", "m.py")
