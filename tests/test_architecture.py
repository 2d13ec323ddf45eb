"""The shape of the house: imports point one way, no cycles, one registry module, small service files.

Dependencies point one way: CLI -> flows -> tasks; bentos import nothing from flows or tasks. Type-only
imports (under ``if TYPE_CHECKING:``) are allowed: stage code is annotated with the spec's types
without importing the flows package at run time. Imports inside functions count: a lazy import that
closes a loop is still a loop (it only hides it from the interpreter until the first call).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGES = ("flows", "tasks", "bentos")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "lockgate." + ".".join(parts)


def _all_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }


def _runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """lockgate modules imported by ``path`` outside ``if TYPE_CHECKING:`` blocks."""
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
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from lockgate.tasks.release import lock`` imports the module lockgate.tasks.release.lock
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _all_modules()
    return {name: _runtime_imports(path, modules) - {name} for name, path in modules.items()}


@pytest.mark.parametrize(("package", "forbidden"), [("tasks", ("flows",)), ("bentos", ("flows", "tasks"))])
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    prefixes = tuple(f"lockgate.{name}" for name in forbidden)
    offenders = {
        name: sorted(target for target in targets if target.startswith(prefixes))
        for name, targets in _graph().items()
        if name.startswith(f"lockgate.{package}") and any(t.startswith(prefixes) for t in targets)
    }
    assert offenders == {}, f"{package}/ must not import {list(forbidden)} at run time: {offenders}"


def test_no_import_cycles() -> None:
    """Depth-first search over the module graph (package __init__ files included)."""
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_service_files_stay_small() -> None:
    big = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in (REPO_ROOT / "bentos").rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 600
    }
    assert big == {}, f"split these along the request path: {big}"


def test_every_package_folder_is_installed() -> None:
    """pyproject lists packages by hand (package-dir mapping): a new sub-package must be listed too."""
    configured = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        _module_name(init) for package in PACKAGES for init in (REPO_ROOT / package).rglob("__init__.py")
    }
    assert folders == configured


def test_registry_calls_live_in_one_module() -> None:
    stage_calls = ("transition_model_version_stage", "set_registered_model_alias", "get_latest_versions")
    users = {
        str(path.relative_to(REPO_ROOT))
        for folder in ("flows", "tasks")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if any(call in path.read_text() for call in stage_calls)
    }
    assert users == {"tasks/platform/model_registry.py"}
