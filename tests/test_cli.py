"""The CLI as a user runs it: exit codes, error lines, JSON output, and start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

from flows.spec_loader import SCHEMA_PATH


def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_validate_ok_and_json() -> None:
    done = _cli("validate", "-f", "pipelines.yaml", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"valid": True, "pipelines": ["demo"]}


def test_validate_reports_every_error_with_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "pipelines:\n"
        "  demo:\n"
        "    cannary: {steps: [5, 100]}\n"
        "    compress:\n"
        "      candidates:\n"
        "        - name: int8\n"
        "          steps: [{quantize: {bits: 7}}]\n"
    )
    done = _cli("validate", "-f", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"{bad}:4:5: pipelines.demo.tracking: missing required field 'tracking'",
        f"{bad}:4:5: pipelines.demo.cannary: unknown key 'cannary'; did you mean 'canary'?",
        f"{bad}:8:37: pipelines.demo.compress.candidates.0.steps.0.quantize.bits: Input should be 8 (got 7)",
    ]


def test_run_refuses_a_bad_spec_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npipelines: {demo: {compress: [}\n")
    done = _cli("run", "-f", str(bad))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{bad}:2:")
    assert "yaml:" in done.stderr


def test_run_names_an_unknown_pipeline() -> None:
    done = _cli("run", "nope", "-f", "pipelines.yaml")
    assert done.returncode == 2
    assert "no pipeline named 'nope'; known: demo" in done.stderr


def test_schema_matches_committed_file() -> None:
    done = _cli("schema")
    assert done.returncode == 0
    assert json.loads(done.stdout) == json.loads(SCHEMA_PATH.read_text())


def test_validate_imports_no_heavy_library() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app; "
        "r = CliRunner().invoke(app, ['validate', '-f', 'pipelines.yaml']); "
        "assert r.exit_code == 0, r.output; "
        "heavy = ('torch', 'mlflow', 'bentoml', 'prefect', 'transformers'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
