"""Client failover during a canary: a request the candidate cannot answer is answered by stable, and a
candidate whose process is gone stops the canary and is rolled back through the registry.

* fast: the router against a real loopback HTTP server (stable) and a port nobody listens on;
* slow: real `bentoml serve` services; the candidate's process group is killed with SIGKILL in the
  middle of a canary step, while requests are in flight.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest

from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.processes import kill_service_tree
from lockgate.flows.spec import CanarySpec
from lockgate.tasks.canary import canary_task
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.canary_strategy import run_steps
from lockgate.tasks.release.replay import FailoverRouter
from lockgate.tasks.release.state import CanaryState


class _Answer(BaseHTTPRequestHandler):
    """A stand-in stable service: answers every /generate with one token."""

    def do_POST(self) -> None:  # http.server calls it by this name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"text": " hi", "output_tokens": 1, "model_version": "1"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stable_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_router_fails_over_to_stable_and_a_dead_candidate_stops_the_canary(stable_url: str) -> None:
    spec = CanarySpec(steps=(50, 100), min_canary_requests=20, users=97, max_new_tokens=2)
    with httpx.Client(timeout=5) as client:
        router = FailoverRouter(client, stable_url, _dead_url(), spec.max_new_tokens)
        result = run_steps(router.send, ["p"], spec, mirror=router.mirror, health=router.health)
    assert result.decision == "rollback"
    serving = next(c for c in result.steps[0].checks if c.name == "serving")
    assert serving.verdict == "fail" and "does not answer" in serving.message
    # Stopped at the first canary request: one failover, and every user got an answer.
    assert result.canary_requests == 1 and router.counts.failovers == 1
    assert router.counts.failed == 0 and router.counts.requests >= 1
    assert router.dead is not None


def _launch(role: str, uri: str, tmp: Path) -> dict:
    return {
        "target": "lockgate.bentos.llm_service:LLMService",
        "role": role,
        "model_uri": uri,
        "request_log": tmp / f"{role}.sqlite",
        "log_dir": tmp / "logs",
        "torch_threads": 1,
        "config": ServiceConfig.model_validate({"batching": {"max_latency_ms": 1}, "warmup_requests": 1}),
    }


def _kill_candidate_mid_step(model: str, step_phase: str, stop: threading.Event, killed: list[int]) -> None:
    """Watch the release lock (the canary records its services and phase there) and SIGKILL the
    candidate's processes a moment into ``step_phase``, while requests are in flight."""
    while not stop.is_set():
        held = release_lock.current(model)
        if held is not None and held.phase.startswith(step_phase) and len(held.services) == 2:
            time.sleep(1.0)  # into the step: some canary requests of this step were answered
            killed += kill_service_tree(held.services[1])  # launched second: [stable, canary]
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_candidate_killed_mid_step_fails_over_with_zero_failed_requests_and_rolls_back(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    name = f"failover-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="failover-test"):
        stable = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        candidate = registry.log_model_version(tiny_llm_dir, name, {})
    registry.promote_first_production(stable, "test baseline")
    registry.stage_candidate(candidate, "test candidate")
    spec = CanarySpec(
        steps=({"share": 20, "min_requests": 10}, {"share": 50, "min_requests": 400}, 100),
        max_requests_per_step=2000,
        users=97,
        max_new_tokens=4,
        thresholds={"max_latency_ratio": 3.0},
    )
    lock, _ = release_lock.acquire(name, "failover-test")
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_candidate_mid_step, args=(name, "canary step 2/3", stop, killed), daemon=True
    )
    killer.start()
    try:
        state = CanaryState.start(
            spec,
            bento_tag="lockgate.bentos.llm_service:LLMService",
            stable=stable,
            candidate=candidate,
            prompts=["tell me a joke", "hello world", "the lazy dog", "say hi", "good morning"],
            request_log=tmp_path / "requests.sqlite",
            log_dir=tmp_path / "logs",
            report_dir=None,
            mlflow_run_id=None,
        )
        result = canary_task.fn(state, spec, "test", lock)
    finally:
        stop.set()
        killer.join(5)
        release_lock.release(lock)

    assert len(killed) >= 2, f"the candidate was not killed (leader + worker): {killed}"
    assert result.decision == "rollback", result.reason
    assert len(result.steps) == 2 and result.steps[0].verdict == "pass"
    failed = {c.name for c in result.steps[1].checks if c.verdict == "fail"}
    assert "serving" in failed, result.reason
    details = result.details
    print(
        f"failover: {details['client_requests']} user requests, {details['failovers']} failed over, "
        f"{details['client_failed']} failed; reason: {result.reason}"
    )
    assert details["client_failed"] == 0  # every user request got an answer, from stable if need be
    assert int(details["failovers"]) >= 1 and int(details["client_requests"]) > 10
    assert "does not answer" in str(details["candidate_dead"])
    # Rolled back through the registry: the candidate Archived, Production unchanged.
    assert registry.version_in_stage(name, "Production") == stable
    assert registry.describe_version(candidate).stage == "Archived"
    assert registry.describe_version(candidate).tags[registry.TAG_DECISION] == "rolled_back"
    assert registry.version_in_stage(name, "Staging") is None
