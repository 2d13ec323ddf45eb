"""The installed distribution says what it is: its license (PEP 639) and where the project lives."""

from __future__ import annotations

import tomllib
from importlib.metadata import distribution
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_license_expression_and_file_are_in_the_metadata() -> None:
    dist = distribution("lockgate")
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    assert dist.metadata.get_all("License-File") == ["LICENSE"]
    license_text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_project_urls_are_the_ones_pyproject_declares() -> None:
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]
    installed = dict(
        entry.split(", ", 1) for entry in distribution("lockgate").metadata.get_all("Project-URL") or []
    )
    assert set(installed) >= {"Homepage", "Documentation", "Issues", "Changelog"}
    assert installed == declared
    assert all(url.startswith("https://github.com/lockgate/lockgate") for url in installed.values())
