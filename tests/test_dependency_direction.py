"""The package dependency direction of ARCHITECTURE.md, checked on the source.

``node`` and ``coordinator`` build on ``marketplace`` and never import each other;
``marketplace`` imports neither, except lazily inside functions of ``marketplace.cli``
(the command line is the edge that starts them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("marketplace", "node", "coordinator")
FORBIDDEN = {
    "marketplace": {"node", "coordinator"},
    "node": {"coordinator"},
    "coordinator": {"node"},
}


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST, bool]]:
    """(top-level module imported, node, whether the import sits inside a function)."""
    found: list[tuple[str, ast.AST, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], child, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        lazy_allowed = package == "marketplace" and relative.parts[1] == "cli"
        for module, node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            if module in FORBIDDEN[package] and not (lazy_allowed and in_function):
                problems.append(f"{relative}:{node.lineno} imports {module}")
    return problems


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_direction(package: str) -> None:
    assert _violations(package) == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    tree = ast.parse("import os\nfrom coordinator.api import x\ndef f():\n    import node\n")
    assert [(m, lazy) for m, _, lazy in _imports(tree)] == [
        ("os", False),
        ("coordinator", False),
        ("node", True),
    ]
