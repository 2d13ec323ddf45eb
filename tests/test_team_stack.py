"""The team setup for real: `lockgate up` (PostgreSQL + MLflow server + Prefect server + a process
worker, all on loopback), release and monitor deployments run by the worker, candidate compression on
a local Dask cluster of 2 workers, a worker killed mid-flow, the MLflow server restarted mid-release.

Slow (a few release runs of a trimmed demo spec), run in CI too; PostgreSQL comes from Debian's
packages (`make postgres`). The trained demo model is shared through LOCKGATE_DEMO_CACHE, which the
workers — and so the flow runs — inherit from this process.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]  # the test's environment plus the stack's URLs (what a team member exports)

    @property
    def mlflow_url(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def prefect_url(self) -> str:
        return self.env["PREFECT_API_URL"]


def _cli(stack_env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = run_cli(*args, timeout=timeout, env=stack_env)
    assert done.returncode == 0, f"lockgate {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Its own home, searchable by the postgres user (pytest's and mkdtemp's folders are 0700).
    home = Path(tempfile.mkdtemp(prefix="lockgate-stack-"))
    home.chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "PREFECT_API", "LOCKGATE_")) or key == "LOCKGATE_DEMO_CACHE"
    }
    env.update(
        {
            "LOCKGATE_HOME": str(home / "home"),
            "LOCKGATE_REPORTS_DIR": str(home / "reports"),
            "LOCKGATE_TASK_RUNNER": "dask",
            "LOCKGATE_DASK_WORKERS": "2",
            "PREFECT_HOME": str(home / "prefect-client"),
        }
    )
    try:
        exports = _cli(env, "up", "--workers", "1", "--print-env", timeout=600).stdout
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        yield Stack(home, env)
    finally:
        subprocess.run(
            [sys.executable, "-m", "lockgate.flows.cli", "down"],
            cwd=REPO_ROOT,
            env=env,
            timeout=300,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)  # the stopped cluster, artifacts and logs


def _spec(stack: Stack, candidates: int = 2, reject: bool = False) -> tuple[Path, str]:
    """The repo's demo pipeline, trimmed for time (fewer rows, a two-step canary), with its own
    registered model; ``candidates`` INT8 recipes (torchao, quanto) so Dask has work for both workers.

    ``reject`` makes the size gate unpassable (no canary: a shorter run)."""
    text = yaml.safe_load((REPO_ROOT / "pipelines.yaml").read_text())
    pipeline = text["pipelines"]["demo"]
    name = f"team-{uuid.uuid4().hex[:8]}"
    pipeline["tracking"] = {"experiment": name, "registered_model": name}
    pipeline["data"]["eval"]["max_samples"] = 40
    pipeline["evaluate"].update({"max_samples": 40, "latency_prompts": 12})
    # Gates on quality and size only: latency is measured on a shared machine, and INT8 on this tiny
    # model is slower than its parent on CPU (pipelines.yaml), which is not what these tests are about.
    pipeline["compress"]["allow_slower_quantized"] = True
    pipeline["evaluate"]["gates"] = {
        "perplexity": {"max_increase_pct": 10.0},
        "accuracy": {"max_drop_pct": 10.0},
        "size_bytes": {"max_ratio": 0.05 if reject else 0.6},
    }
    recipes = [
        {"name": "int8", "steps": [{"quantize": {"bits": 8, "backend": "torchao", "ignore": ["lm_head"]}}]},
        {"name": "int8q", "steps": [{"quantize": {"bits": 8, "backend": "quanto", "ignore": ["lm_head"]}}]},
    ]
    pipeline["compress"]["candidates"] = recipes[:candidates]
    pipeline["canary"].update({"steps": [50, 100], "min_canary_requests": 10, "max_requests_per_step": 60})
    pipeline["canary"]["thresholds"].update({"max_latency_p95_ratio": 20.0, "max_latency_ratio": 20.0})
    pipeline["monitor"]["min_rows"] = 5
    path = stack.home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path, name


def _prefect(stack: Stack, coro_fn, *args: object):  # type: ignore[no-untyped-def]
    """Run ``coro_fn(client, *args)`` against the stack's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():  # type: ignore[no-untyped-def]
        async with get_client() as client:
            return await coro_fn(client, *args)

    with temporary_settings({PREFECT_API_URL: stack.prefect_url}):
        return asyncio.run(call())


def _start_run(stack: Stack, deployment: str) -> str:
    async def go(client, name):  # type: ignore[no-untyped-def]
        found = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(found.id)
        return str(run.id)

    return _prefect(stack, go, deployment)


def _flow_run(stack: Stack, run_id: str):  # type: ignore[no-untyped-def]
    async def go(client, rid):  # type: ignore[no-untyped-def]
        return await client.read_flow_run(rid)

    return _prefect(stack, go, run_id)


def _wait_final(stack: Stack, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _flow_run(stack, run_id).state
        if state is not None and state.type.value in FINAL:
            return state.type.value
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not finished after {timeout_s:.0f}s: {state}")


def _task_runs(stack: Stack, run_id: str) -> list:
    async def go(client, rid):  # type: ignore[no-untyped-def]
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[rid])))

    return _prefect(stack, go, run_id)


def _wait_task(stack: Stack, run_id: str, prefix: str, timeout_s: float = 1500) -> None:
    """Until a task run named ``prefix…`` of the flow run is running (or the flow run ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(t.name.startswith(prefix) and t.state_type is not None for t in _task_runs(stack, run_id)):
            return
        state = _flow_run(stack, run_id).state
        assert state is None or state.type.value not in FINAL, f"flow run ended before {prefix}: {state}"
        time.sleep(1)
    raise AssertionError(f"no {prefix} task in flow run {run_id} after {timeout_s:.0f}s")


def _flow_logs(stack: Stack, run_id: str) -> str:
    async def go(client, rid):  # type: ignore[no-untyped-def]
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[rid])))
        return "\n".join(entry.message for entry in logs)

    return _prefect(stack, go, run_id)


def _production_versions(stack: Stack, name: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
    return [
        v.version for v in client.search_model_versions(f"name='{name}'") if v.current_stage == "Production"
    ]


def test_stack_runs_the_release_deployment_on_a_worker_with_dask_through_an_mlflow_restart(
    stack: Stack,
) -> None:
    """(a) the trimmed default pipeline as a deployment run on the process worker, compression on a
    2-worker Dask cluster, results in the MLflow server on PostgreSQL; (d) the MLflow server is restarted
    while the release registers its versions: the client retries and the flow completes."""
    import mlflow
    from mlflow import MlflowClient

    spec_path, name = _spec(stack)
    deployed = _cli(stack.env, "deploy", "demo", "-f", str(spec_path), "--pool", "lockgate")
    assert "release/demo-release -> pool lockgate (on demand)" in deployed.stdout
    run_id = _start_run(stack, "release/demo-release")

    _wait_task(stack, run_id, "register")
    restarted = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lockgate.tasks.platform.team_stack import restart_mlflow; restart_mlflow()",
        ],
        cwd=REPO_ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert restarted.returncode == 0, restarted.stderr[-3000:]

    assert _wait_final(stack, run_id, 1500) == "COMPLETED", _flow_logs(stack, run_id)[-5000:]
    flow_run = _flow_run(stack, run_id)
    assert flow_run.work_pool_name == "lockgate"
    # The flow run's own output (the worker's log): its Dask cluster had two workers.
    worker_log = (stack.home / "home" / "team-stack" / "logs" / "lockgate-worker-1.log").read_text()
    assert worker_log.count("distributed.scheduler - Register worker") >= 2, worker_log[-3000:]

    # Results landed in the server: the release run, its stage runs, versions, downloadable artifacts.
    client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
    experiment = client.get_experiment_by_name(name)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploads went through the server
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lockgate.pipeline") == "demo")
    assert parent.data.tags["prefect.flow_run_id"] == run_id
    stages = {
        r.data.tags.get("lockgate.stage")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert {"compress-int8", "compress-int8q", "evaluate-int8", "register", "canary", "monitor"} <= stages
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) >= 3  # the baseline and both candidates
    assert len(_production_versions(stack, name)) == 1
    # The canary decided (latency is judged on a shared 2-core machine: a rollback is a decision too).
    assert parent.data.tags["lockgate.outcome"] in {"promoted", "rolled_back"}
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id,
        artifact_path="spec",
        tracking_uri=stack.mlflow_url,
        dst_path=str(stack.home / "dl"),
    )
    assert (Path(downloaded) / spec_path.name).read_text() == spec_path.read_text()
    assert list((stack.home / "home" / "team-stack" / "mlartifacts").rglob("MLmodel"))


def test_monitor_deployment_runs_on_the_cron_schedule_of_the_spec(stack: Stack) -> None:
    """(b) `lockgate deploy --pool` makes the monitor deployment with the spec's cron; the worker runs it."""
    spec_path, _ = _spec(stack)
    cron = yaml.safe_load(spec_path.read_text())["pipelines"]["demo"]["monitor"]["schedule"]
    _cli(stack.env, "deploy", "demo", "-f", str(spec_path), "--pool", "lockgate")

    async def schedules(client, name):  # type: ignore[no-untyped-def]
        deployment = await client.read_deployment_by_name(name)
        return deployment.work_pool_name, [s.schedule.cron for s in deployment.schedules if s.active]

    pool, crons = _prefect(stack, schedules, "monitor/demo-monitor")
    assert (pool, crons) == ("lockgate", [cron])
    run_id = _start_run(stack, "monitor/demo-monitor")
    assert _wait_final(stack, run_id, 300) == "COMPLETED", _flow_logs(stack, run_id)[-5000:]


def test_worker_killed_mid_flow_crashes_the_run_and_a_rerun_completes(stack: Stack) -> None:
    """(c) the worker and its flow run die (SIGKILL, as when a machine goes): the server marks the run
    Crashed once its heartbeats stop; a new worker re-runs the release, which takes over the dead release
    lock, and the registry ends with exactly one Production version."""
    import psutil

    spec_path, name = _spec(stack, candidates=1, reject=True)
    _cli(stack.env, "deploy", "demo", "-f", str(spec_path), "--pool", "lockgate")
    first = _start_run(stack, "release/demo-release")
    _wait_task(stack, first, "compress")

    from lockgate.tasks.platform.team_stack import StackState

    state_file = stack.home / "home" / "team-stack" / "stack.json"
    state = StackState(**yaml.safe_load(state_file.read_text()))
    worker = psutil.Process(state.processes["lockgate-worker-1"])
    tree = [worker, *worker.children(recursive=True)]
    assert len(tree) > 1, "the flow run should be a child of the worker"
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=30)

    replacement = subprocess.Popen(
        [sys.executable, "-m", "lockgate.flows.cli", "worker", "--name", "lockgate-worker-2"],
        cwd=REPO_ROOT,
        env=stack.env,
        stdout=subprocess.DEVNULL,
        stderr=open(stack.home / "worker-2.log", "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    try:
        second = _start_run(stack, "release/demo-release")
        assert _wait_final(stack, first, 300) == "CRASHED"
        assert _wait_final(stack, second, 1500) == "COMPLETED", _flow_logs(stack, second)[-5000:]
    finally:
        os.killpg(replacement.pid, 15)
        replacement.wait(timeout=60)
    assert len(_production_versions(stack, name)) == 1
    logs = _flow_logs(stack, second)
    assert "took over" in logs or "release lock" in logs, logs[-3000:]
