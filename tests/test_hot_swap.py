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
    answers: list[tuple[float, int, str | None, float]] = []  # (answered at, status, version, sent at)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                r = client.post(
                    f"{service.url}/generate",
                    json={"prompt": "Q: what is 2 plus 2?\nA:", "max_new_tokens": 2},
                )
                answers.append((time.monotonic(), r.status_code, r.json().get("model_version"), sent))

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
        while time.monotonic() < deadline and not any(v == v2.version for _, _, v, _ in answers[-3:]):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
    statuses = {code for _, code, _, _ in answers}
    assert statuses == {200}, f"failed requests during the swap: {statuses}"
    before = [v for t, _, v, _ in answers if t < asked_at]
    assert before and set(before) == {v1.version}
    switched = [t for t, _, v, _ in answers if v == v2.version]
    assert switched, f"v{v2.version} never served within 30 s of its promotion"
    first_new = min(switched)
    assert first_new - promoted_at < 5.0, f"served v2 only {first_new - promoted_at:.1f}s after promotion"
    assert first_new >= asked_at
    # Once switched, it stays switched: every request sent after the first v2 answer gets v2. (A request
    # admitted on v1 before the swap still finishes on v1, possibly after that answer: the old engine
    # runs its admitted requests to the end while the new one already serves.)
    assert {v for _, _, v, s in answers if s > first_new} == {v2.version}


def test_recalibration_tag_rescales_confidence_live_and_is_logged(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    """The monitor's recalibrate response tags the Production version; the service applies the
    temperature without a reload, and logs the calibrated confidence for the next feedback join."""
    from bentos.model_resolver import CALIBRATION_TAG
    from bentos.request_log import RequestLog

    name = f"calib-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="calibration-test"):
        v1 = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        registry.promote_first_production(v1, "test")
    log_path = tmp_path / "requests.sqlite"
    [service] = start_services(
        [
            {
                "target": "bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": f"models:/{name}/Production",
                "request_log": log_path,
                "log_dir": tmp_path / "logs",
                "extra_env": {"LOCKGATE_REGISTRY_POLL_S": "0.3"},
            }
        ]
    )
    body = {"prompt": "Q: what is 2 plus 2?\nA:", "max_new_tokens": 1}
    with service, httpx.Client(timeout=30) as client:
        raw = client.post(f"{service.url}/generate", json=body).json()
        registry.set_tags(v1, {CALIBRATION_TAG: "4"})
        deadline = time.monotonic() + 10
        scaled = raw
        while time.monotonic() < deadline and scaled["confidence"] == raw["confidence"]:
            time.sleep(0.3)
            scaled = client.post(f"{service.url}/generate", json=body).json()
    p = raw["confidence"]
    expected = 1 / (1 + ((1 - p) / p) ** (1 / 4))  # σ(logit(p) / 4)
    assert scaled["text"] == raw["text"] and scaled["model_version"] == raw["model_version"]
    assert abs(scaled["confidence"] - expected) < 1e-4, (p, scaled["confidence"], expected)
    logged = RequestLog(log_path).read_frame()
    assert logged["confidence"].notna().all()
    assert abs(logged["confidence"].iloc[0] - p) < 1e-5
