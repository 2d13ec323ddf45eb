"""The CLI as a user runs it: exit codes, error lines, JSON output, and start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, run_cli
from lockgate.flows.spec_loader import SCHEMA_PATH

_cli = run_cli


def test_validate_ok_and_json() -> None:
    done = _cli("validate", "-f", "pipelines.yaml", "--json")
    assert done.returncode == 0
    result = json.loads(done.stdout)
    assert result["valid"] and result["pipelines"] == ["demo", "smollm2"]
    # The demo's gates fit its evaluation set; the real model's 103-row set cannot resolve a 5 % gate,
    # which validate says (its gates read confidence intervals: evaluate.confidence.gate_rule).
    assert not [w for w in result["warnings"] if ".demo." in w]
    assert all(".smollm2." in w for w in result["warnings"])


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
        f"{bad}:8:37: pipelines.demo.compress.candidates.0.steps.0.quantize.bits: "
        "Input should be 8 or 4 (got 7)",
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
        "import sys; from typer.testing import CliRunner; from lockgate.flows.cli import app; "
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


PLAN_SPEC = """\
version: 1
pipelines:
  paced:
    compress: {candidates: [{name: int8, steps: [{quantize: {}}]}]}
    canary:
      steps: [10, {share: 50, duration_s: 30}, 100]
      min_canary_requests: 20
      traffic_per_s: 10
    tracking: {registered_model: paced-llm}
"""


def test_plan_prints_promotion_and_rollback_times(tmp_path: Path) -> None:
    spec = tmp_path / "pipelines.yaml"
    spec.write_text(PLAN_SPEC)
    done = _cli("plan", "-f", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    # 10 %: 200 requests for 20 canary ones at 10 req/s = 20 s; 50 %: the 30 s duration; 100 %: 20
    # canary requests, each mirrored to stable (the concurrent baseline) = 4 s.
    assert [s["min_time_s"] for s in plan["steps"]] == [20.0, 30.0, 4.0]
    assert [s["max_time_s"] for s in plan["steps"]] == [60.0, 90.0, 12.0]  # two extensions each
    assert plan["min_promotion_s"] == 54.0
    assert plan["worst_case_rollback_s"] == 92.0  # longest step with extensions + the service's poll
    assert plan["worst_case_decision_s"] == 162.0
    text = _cli("plan", "-f", str(spec)).stdout
    assert "minimum promotion time        54s" in text
    assert "worst-case rollback time      92s" in text


def test_plan_imports_no_heavy_library() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from lockgate.flows.cli import app; "
        "r = CliRunner().invoke(app, ['plan', '-f', 'pipelines.yaml']); "
        "assert r.exit_code == 0, r.output; "
        "heavy = ('torch', 'mlflow', 'bentoml', 'prefect', 'transformers', 'numpy'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_refuses_while_another_release_holds_the_model(tmp_path: Path, lockgate_home: Path) -> None:
    from lockgate.tasks.release import lock as release_lock

    spec = tmp_path / "pipelines.yaml"
    spec.write_text(PLAN_SPEC)
    ref, _ = release_lock.acquire("paced-llm", "dave@ci:77 (prefect-flow-run:f00)")
    try:
        release_lock.renew(ref, phase="canary step 1/3 at 10%")
        done = _cli("run", "-f", str(spec))
    finally:
        release_lock.release(ref)
    assert done.returncode == 1
    assert (
        "paced-llm: a release is already running, owned by dave@ci:77 (prefect-flow-run:f00)" in done.stderr
    )
    assert "phase canary step 1/3 at 10%" in done.stderr


def test_promote_and_rollback_to_a_version(tiny_llm_dir: Path, tracking: str) -> None:
    import uuid

    import mlflow

    from lockgate.tasks.platform import model_registry as registry

    name = f"cli-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="cli-promote-test"):
        v1, v2, v3 = (registry.log_model_version(tiny_llm_dir, name, {}) for _ in range(3))
    registry.promote_first_production(v1, "first")
    registry.stage_candidate(v2, "gates passed")
    promoted = _cli("promote", name, "--reason", "looks good", "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout) == {"model": name, "production": "2", "archived": "1"}
    assert _cli("promote", name).stderr.strip() == f"{name} has no Staging version to promote; pass --version"
    assert _cli("promote", name, "--version", "3", "--json").returncode == 0
    rolled = _cli("rollback", name, "--version", "1", "--reason", "both bad", "--json")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"model": name, "production": "1", "archived": "3"}
    assert {v.version: v.stage for v in registry.list_versions(name)} == {
        "1": "Production",
        "2": "Archived",
        "3": "Archived",
    }
    assert registry.describe_version(v3).tags[registry.TAG_REASON] == "both bad"
    # The champion alias moved with each of those transitions.
    assert str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"
    # --to is the deprecated name of --version: it still works, and says so.
    again = _cli("rollback", name, "--to", "1")
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        "--to is deprecated: use --version",
        f"{name} v1 is already in Production",
    ]
    unknown = _cli("rollback", f"{name}-missing", "--reason", "typo")
    assert unknown.returncode != 0
    assert unknown.stderr.strip() == f"no registered model named '{name}-missing'", unknown.stderr


def test_version_flag() -> None:
    from importlib.metadata import version

    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"lockgate {version('lockgate')}"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens on it once the socket is closed


def test_profile_against_a_dead_url_fails_with_one_line() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    done = _cli("profile", "--url", url, "-n", "3")
    assert done.returncode == 1
    assert done.stderr.strip() == f"{url}: no service answers (ConnectError); start one with `lockgate serve`"
    assert "nan" not in done.stdout.lower()


def test_history_of_an_unknown_model_exits_non_zero(tracking: str) -> None:
    unknown = _cli("history", "no-such-model-at-all")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "no registered model named 'no-such-model-at-all'"


def test_canary_status_watch_ends_when_no_release_runs(lockgate_home: Path) -> None:
    done = _cli("canary", "status", "no-such-model-at-all", "--watch", "--interval", "0.5", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no-such-model-at-all: production v-; nothing in Staging; no release running" in done.stdout


def _spec_with_model(tmp_path: Path, **model: object) -> Path:
    import yaml

    spec = yaml.safe_load((REPO_ROOT / "pipelines.yaml").read_text())
    spec["pipelines"]["demo"]["model"] = {**spec["pipelines"]["demo"].get("model", {}), **model}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_validate_refuses_a_remote_url_as_model_source(tmp_path: Path) -> None:
    for url in ("https://example.com/model.safetensors", "s3://bucket/model", "http://host/m"):
        done = _cli("validate", "-f", str(_spec_with_model(tmp_path, source=url)))
        assert done.returncode == 2, done.stdout
        assert "pipelines.demo.model.source" in done.stderr and "remote URL" in done.stderr, done.stderr
    done = _cli("validate", "-f", str(_spec_with_model(tmp_path, source="models:/demo-model/1")))
    assert "remote URL" not in done.stderr  # an MLflow URI is not a URL (other checks may apply)


def test_validate_refuses_trust_remote_code(tmp_path: Path) -> None:
    done = _cli("validate", "-f", str(_spec_with_model(tmp_path, trust_remote_code=True)))
    assert done.returncode == 2
    assert "pipelines.demo.model.trust_remote_code" in done.stderr and "never runs" in done.stderr


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_API_KEYS_FILE"}
    env.update(LOCKGATE_HOME=str(tmp_path / "home"), LOCKGATE_HOST="0.0.0.0")
    done = _cli("serve", "-f", str(REPO_ROOT / "pipelines.yaml"), env=env)
    assert done.returncode == 2
    assert "needs API keys" in done.stderr and "lockgate keys add" in done.stderr, done.stderr
