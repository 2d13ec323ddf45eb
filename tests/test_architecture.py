"""Dependencies point one way: CLI -> flows -> tasks; bentos import nothing from flows or tasks.

Type-only imports (under ``if TYPE_CHECKING:``) are allowed: stage code is annotated with the spec's
types without importing the flows package at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for child in ast.walk(node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("tasks", {"flows"}), ("bentos", {"flows", "tasks"})],
)
def test_imports_point_one_way(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(_runtime_imports(path) & forbidden)
        for path in sorted((REPO_ROOT / package).glob("*.py"))
        if _runtime_imports(path) & forbidden
    }
    assert offenders == {}, f"{package}/ must not import {sorted(forbidden)} at run time: {offenders}"


def test_registry_calls_live_in_one_module() -> None:
    stage_calls = ("transition_model_version_stage", "set_registered_model_alias", "get_latest_versions")
    users = {
        str(path.relative_to(REPO_ROOT))
        for folder in ("flows", "tasks")
        for path in (REPO_ROOT / folder).glob("*.py")
        if any(call in path.read_text() for call in stage_calls)
    }
    assert users == {"tasks/registry.py"}
