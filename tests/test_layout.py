"""The layout is the architecture, and stays one a person can hold: imports go one way, no module or
function grows past what one screen (or a few) can show."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ablate", "core", "trainer", "eval")
# what each package may import of the others: ablate → trainer → eval → core
MAY_IMPORT = {
    "core": set(),
    "eval": {"core"},
    "trainer": {"eval", "core"},
    "ablate": {"trainer", "eval", "core"},
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def imported(tree: ast.AST) -> set[str]:
    """The top-level packages a module imports (absolute imports; the project uses no relative ones)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    for path in modules(package):
        others = imported(ast.parse(path.read_text())) & set(PACKAGES) - {package}
        assert others <= MAY_IMPORT[package], (
            f"{path.relative_to(ROOT)} imports {sorted(others - MAY_IMPORT[package])}"
        )


def test_no_module_is_longer_than_one_person_can_hold():
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules(*PACKAGES)
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screen():
    long = {}
    for path in modules(*PACKAGES, "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
