"""Shared by the live-delivery tests: real per-version services, a candidate that fails a share of its
requests, router replicas as real processes, and registry models whose versions they serve."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT
from lockgate.bentos.config import BatchingConfig, ServiceConfig, ServiceEnv
from lockgate.bentos.processes import stop_service
from lockgate.bentos.rollout import (
    TAG_BASELINE,
    TAG_CANDIDATE,
    TAG_SHARE,
    TAG_STATE,
    TAG_STEP,
    TAG_STEP_STARTED,
)
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.release.serving import free_port, start_services

# A latency budget of 1 ms and one warm-up generation: live tests measure routing, not batching. The
# transformers engine in this interpreter: the tiny model has no vLLM CPU kernel (head size 16) anyway.
FAST_SERVICE = ServiceConfig(
    engine="transformers", batching=BatchingConfig(max_latency_ms=1), warmup_requests=1
)


def spawning_router_env(tmp_path: Path) -> dict[str, str]:
    """What a router that starts its own services (``lockgate serve``) gets in tests: the fast service
    config, a model cache, one thread per service, a short grace before an unneeded service stops."""
    return {
        **ServiceEnv(config=FAST_SERVICE).to_env(),
        "LOCKGATE_MODEL_CACHE": str(tmp_path / "model-cache"),
        "OMP_NUM_THREADS": "1",
        "LOCKGATE_ROUTER_STOP_GRACE_S": "1",
    }


def running_step(name: str, started: float) -> None:
    """Registry tags of a live canary of v2 against v1 in step 2/4 at 25 %, started at ``started``."""
    registry.set_rollout(
        name,
        {
            TAG_CANDIDATE: "2",
            TAG_BASELINE: "1",
            TAG_SHARE: "25",
            TAG_STATE: "running",
            TAG_STEP: "2/4",
            TAG_STEP_STARTED: f"{started:.3f}",
        },
    )


def service_launch(role: str, model_dir: Path, tmp: Path) -> dict:
    return {
        "target": "lockgate.bentos.llm_service:LLMService",
        "role": role,
        "model_uri": str(model_dir),
        "request_log": tmp / f"{role}.sqlite",
        "log_dir": tmp / "logs",
        "torch_threads": 1,
        "config": FAST_SERVICE,
    }


class FlakyProxy:
    """A candidate that fails ``every``-th request with a 500 (every=5: 20 %), else forwards to a real
    service: the bad candidate of the tests (the failure is the service's answer, as a user sees it)."""

    def __init__(self, upstream: str, every: int = 5) -> None:
        self.upstream, self.every = upstream, every
        self.count, self.failed = 0, 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    proxy.count += 1
                    fail = proxy.count % proxy.every == 0
                    proxy.failed += fail
                if fail:
                    code, payload = 500, b'{"error": "injected failure"}'
                else:
                    answer = httpx.post(
                        f"{proxy.upstream}{self.path}",
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=30,
                    )
                    code, payload = answer.status_code, answer.content
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def register_versions(name: str, source: Path, count: int) -> list[ModelVersionRef]:
    """``count`` versions of a new registered model (registry entries only: the routers under test
    reach each version's service by URL, they load nothing)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model(name)
    return [
        ModelVersionRef(name, str(client.create_model_version(name, str(source)).version))
        for _ in range(count)
    ]


def live_model(source: Path, versions: int = 3) -> tuple[str, list[ModelVersionRef]]:
    """A model with v1 in Production and v2 staged (alias canary)."""
    name = f"live-{uuid.uuid4().hex[:8]}"
    refs = register_versions(name, source, versions)
    registry.promote_first_production(refs[0], "test baseline")
    registry.stage_candidate(refs[1], "test candidate")
    return name, refs


@dataclass
class RouterProcess:
    replica: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        stop_service(self.process, 10)

    def rollout(self) -> dict:
        return httpx.get(f"{self.url}/rollout", timeout=5).json()


def start_router(
    model: str,
    replica: str,
    backends: dict[str, str] | None,
    live_dir: Path,
    poll_s: float = 0.5,
    ready_timeout_s: float = 60,
    extra_env: dict[str, str] | None = None,
) -> RouterProcess:
    """A router replica as its own process; ``backends`` None: it starts each version's service."""
    port = free_port()
    env = {
        **os.environ,
        "LOCKGATE_ROUTER_MODEL": model,
        "LOCKGATE_ROUTER_REPLICA": replica,
        "LOCKGATE_LIVE_LOG_DIR": str(live_dir),
        "LOCKGATE_REGISTRY_POLL_S": str(poll_s),
        **({"LOCKGATE_ROUTER_BACKENDS": json.dumps(backends)} if backends is not None else {}),
        **(extra_env or {}),
    }
    live_dir.mkdir(parents=True, exist_ok=True)
    log_path = live_dir / f"router-{replica}.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "lockgate.bentos.router:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log_path.open("w") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )
    router = RouterProcess(replica, f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"router {replica} exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{router.url}/readyz", timeout=2).status_code == 200:
                return router
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    router.stop()
    raise RuntimeError(f"router {replica} not ready: {log_path.read_text()[-3000:]}")


@contextmanager
def routers(
    model: str, backends: dict[str, str], live_dir: Path, replicas: int = 2, poll_s: float = 0.5
) -> Iterator[list[RouterProcess]]:
    started = [start_router(model, f"r{i}", backends, live_dir, poll_s) for i in range(replicas)]
    try:
        yield started
    finally:
        for router in started:
            router.stop()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def live_services(
    tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path, tracking: str
) -> Iterator[dict]:
    """Two real LLM services (stable, candidate) and a candidate failing 20 % in front of the second."""
    tmp = tmp_path_factory.mktemp("live-services")
    started = start_services(
        [service_launch("stable", tiny_llm_dir, tmp), service_launch("canary", tiny_llm_dir, tmp)]
    )
    flaky = FlakyProxy(started[1].url, every=5)
    try:
        yield {"stable": started[0].url, "candidate": started[1].url, "flaky": flaky.url, "proxy": flaky}
    finally:
        flaky.close()
        for service in started:
            service.stop()


@pytest.fixture(scope="module")
def team_live_url() -> Iterator[str]:
    """A PostgreSQL cluster like the team stack's (same initdb/start/databases code); yields the live
    log URL `lockgate up` exports for it."""
    from lockgate.tasks.platform import team_stack

    try:
        bin_dir = team_stack.postgres_bin_dir()
    except team_stack.StackError as exc:
        pytest.skip(f"no PostgreSQL server binaries: {exc}")
    root = Path(tempfile.mkdtemp(prefix="lockgate-live-pg-"))
    root.chmod(0o755)  # the postgres user (we may be root) must reach the cluster's folder
    password, port = secrets.token_hex(12), team_stack.free_port()
    # The stack's private steps on purpose: a real cluster without MLflow/Prefect servers.
    data = team_stack._init_postgres(bin_dir, root / "postgres", password)
    team_stack._start_postgres(bin_dir, data, port)
    try:
        team_stack._create_databases(port, password)
        state = team_stack.StackState(
            home=str(root / "home"),
            postgres_data=str(data),
            postgres_port=port,
            db_password=password,
            mlflow_url="http://127.0.0.1:1",
            prefect_api_url="http://127.0.0.1:1/api",
            artifacts_destination=str(root / "artifacts"),
            work_pool="unused",
        )
        yield team_stack.stack_environment(state)["LOCKGATE_LIVE_LOG_URL"]
    finally:
        team_stack._stop_postgres(bin_dir, data)
        shutil.rmtree(root, ignore_errors=True)
