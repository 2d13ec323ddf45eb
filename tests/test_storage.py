"""`lockgate gc` on a real MLflow store: what the registry references and the newest runs stay."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest

from lockgate.tasks.platform.storage import apply_gc, plan_gc, tree_bytes


def _files(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(b"\0" * size)
    return folder


def _age(folder: Path, seconds: float) -> None:
    old = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (old, old))


def _release(client, experiment: str, home: Path, n: int, tmp: Path) -> str:
    """A release as the flow records it: parent run, compress stage with its report, package stage."""
    run = client.create_run(experiment, run_name="release-demo", tags={"lockgate.pipeline": "demo"})
    run_id = run.info.run_id
    key = f"{n:02d}" * 32
    compress = client.create_run(
        experiment,
        run_name="compress-int8",
        tags={"mlflow.parentRunId": run_id, "lockgate.candidate": "int8"},
    )
    report = tmp / f"report-{n}" / "lockgate_compress.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"key": key}))
    client.log_artifact(compress.info.run_id, str(report))
    package = client.create_run(experiment, run_name="package", tags={"mlflow.parentRunId": run_id})
    client.log_param(package.info.run_id, "bento_tag", f"svc:v{n}")
    register = client.create_run(experiment, run_name="register", tags={"mlflow.parentRunId": run_id})
    for child in (compress, package, register):
        client.set_terminated(child.info.run_id)
    client.set_terminated(run_id)
    _age(_files(home / "runs" / run_id, 1000), 7200)
    _age(_files(home / "cache" / "candidates" / f"int8-{key[:16]}", 5000), 7200)
    time.sleep(0.02)  # distinct start times: "newest" is well defined
    return register.info.run_id


def test_gc_keeps_referenced_and_recent_runs_and_frees_the_rest(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    home = tmp_path / "home"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("gc", artifact_location=(tmp_path / "artifacts").as_uri())
    registers = [_release(client, experiment, home, n, tmp_path) for n in range(4)]
    run_dirs = sorted((home / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    # Release 0 registered the version still in Production; releases 2 and 3 are the newest two.
    client.create_registered_model("demo-llm")
    live = client.create_model_version("demo-llm", "file:///nowhere", run_id=registers[0])
    old = client.create_model_version("demo-llm", "file:///nowhere", run_id=registers[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage("demo-llm", live.version, "Production")
        client.transition_model_version_stage("demo-llm", old.version, "Archived")
    _age(_files(home / "cache" / "registry" / f"demo-llm-v{live.version}", 300), 7200)
    _age(_files(home / "cache" / "registry" / f"demo-llm-v{old.version}", 300), 7200)
    fresh = _files(home / "cache" / "candidates" / "int8-beingwritten00", 10)  # a release running now
    bentos = {f"svc:v{n}": _files(tmp_path / "bentos" / f"v{n}", 700) for n in range(4)}
    for folder in bentos.values():
        _age(folder, 7200)

    plan = plan_gc(home, client, keep_runs=2, min_age_s=3600, bentos=list(bentos), bento_path=bentos)

    release_ids = [
        r.info.run_id for r in client.search_runs([experiment], "attributes.run_name = 'release-demo'")
    ]
    assert len(plan.kept_runs) == 3 and len(release_ids) == 4
    dropped = set(release_ids) - set(plan.kept_runs)
    assert (
        len(dropped) == 1
    )  # release 1: neither referenced (its version is Archived) nor among the newest two
    freed = {(p.path.parent.name, p.path.name) for p in plan.items}
    (dropped_id,) = dropped
    assert freed == {
        ("runs", dropped_id),
        ("candidates", "int8-" + "01" * 8),
        ("registry", f"demo-llm-v{old.version}"),
        ("bentos", "v1"),
    }
    assert next(i for i in plan.items if i.path.parent.name == "bentos").bento == "svc:v1"
    assert plan.freed_bytes == 1000 + 5000 + 300 + 700
    assert fresh.exists() and run_dirs  # nothing deleted by planning (a dry run)

    # Bentos are deleted through BentoML; here the folders only, as BentoML would.
    before = tree_bytes(home)
    folders_only = plan.__class__(
        plan.home, plan.home_bytes, plan.kept_runs, tuple(i for i in plan.items if not i.bento)
    )
    assert apply_gc(folders_only) == 1000 + 5000 + 300
    assert before - tree_bytes(home) == 1000 + 5000 + 300
    assert not (home / "runs" / dropped_id).exists() and fresh.exists()
    assert (home / "cache" / "registry" / f"demo-llm-v{live.version}").exists()
    again = plan_gc(home, client, keep_runs=2, min_age_s=3600)
    assert again.items == ()


@pytest.mark.parametrize("flag", [[], ["--dry-run"]])
def test_gc_command_is_a_dry_run_by_default(tmp_path: Path, flag: list[str]) -> None:
    from conftest import run_cli

    home = tmp_path / "home"
    stale = _files(home / "runs" / "0123abcd", 2048)
    _age(stale, 7200)
    env = {**os.environ, "LOCKGATE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the home's own (empty) store
    done = run_cli("gc", "--keep-runs", "1", *flag, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        f"{stale}" in done.stdout
        and "would free (dry run; --delete to delete) 2.0 KB in 1 item(s)" in done.stdout
    )
    assert stale.exists()
    done = run_cli("gc", "--keep-runs", "1", "--delete", "--json", env=env, timeout=300)
    assert json.loads(done.stdout)["freed_bytes"] == 2048 and not stale.exists()


def test_release_summary_says_what_the_release_added_to_the_home() -> None:
    from lockgate.flows.release import ReleaseSummary
    from lockgate.flows.summary import render_summary

    summary = ReleaseSummary("demo", "demo-llm", "promoted", "run", "http://mlflow/run", "flow", 1.0)
    summary.home_added_bytes, summary.home_bytes = 1_534_000, 5_900_000_000
    assert "storage    +1.5 MB in LOCKGATE_HOME (now 5.9 GB; `lockgate gc`" in render_summary(summary)
