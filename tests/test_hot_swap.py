"""The service follows the registry: a stage transition alone changes what is served, under load,
without a restart and without a failed request."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import mlflow
from conftest import build_tiny_model

from tasks import registry
from tasks.serving import start_services


def test_stage_transition_switches_served_version_under_load(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    name = f"swap-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="hot-swap-test"):
        v1 = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        registry.promote_first_production(v1, "test")
        v2 = registry.log_model_version(build_tiny_model(tmp_path / "v2", seed=1), name, {})
        registry.stage_candidate(v2, "test")
    [service] = start_services(
        [
            {
                "target": "bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": f"models:/{name}/Production",
                "request_log": tmp_path / "requests.sqlite",
                "log_dir": tmp_path / "logs",
                "extra_env": {"LOCKGATE_REGISTRY_POLL_S": "0.5"},
            }
        ]
    )
    answers: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(
                    f"{service.url}/generate",
                    json={"prompt": "Q: what is 2 plus 2?\nA:", "max_new_tokens": 2},
                )
                answers.append((time.monotonic(), r.status_code, r.json().get("model_version")))

    with service:
        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        # The service may switch while promote() is still tagging: time the transition from its start.
        asked_at = time.monotonic()
        registry.promote(v2, "hot swap test")
        promoted_at = time.monotonic()
        deadline = promoted_at + 30
        while time.monotonic() < deadline and not any(v == v2.version for _, _, v in answers[-3:]):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
    statuses = {code for _, code, _ in answers}
    assert statuses == {200}, f"failed requests during the swap: {statuses}"
    before = [v for t, _, v in answers if t < asked_at]
    assert before and set(before) == {v1.version}
    switched = [t for t, _, v in answers if v == v2.version]
    assert switched, f"v{v2.version} never served within 30 s of its promotion"
    first_new = min(switched)
    assert first_new - promoted_at < 5.0, f"served v2 only {first_new - promoted_at:.1f}s after promotion"
    assert first_new >= asked_at
    # Once switched, it stays switched.
    assert {v for t, _, v in answers if t > first_new} == {v2.version}
