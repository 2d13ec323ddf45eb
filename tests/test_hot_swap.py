"""The service follows the registry: a stage transition alone changes what is served, under load,
without a restart and without a failed request."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import mlflow

from conftest import build_tiny_model
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release.serving import start_services


def _promote(version: registry.ModelVersionRef, stamps: Any) -> None:
    """Promote, noting when it started and ended (CLOCK_MONOTONIC is the same in every process)."""
    stamps[0] = time.monotonic()
    registry.promote(version, "hot swap test")
    stamps[1] = time.monotonic()


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
                "target": "lockgate.bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": f"models:/{name}/Production",
                "request_log": tmp_path / "requests.sqlite",
                "log_dir": tmp_path / "logs",
                "registry_poll_s": 0.5,
            }
        ]
    )
    answers: list[tuple[float, int, str | None, float]] = []  # (answered at, status, version, sent at)
    livez: list[tuple[float, float]] = []  # (sent at, seconds to answer)
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                client.get(f"{service.url}/livez")
                livez.append((sent, time.monotonic() - sent))
                time.sleep(0.05)

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
        workers = [threading.Thread(target=load) for _ in range(3)] + [threading.Thread(target=probe)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        # The service may switch while promote() is still tagging: time the transition from its start.
        # In another process: MLflow's promote is busy Python, and in this process it would take the
        # GIL from the client threads, whose timings would then show a stall the service never had.
        spawn = multiprocessing.get_context("spawn")
        stamps = spawn.Array("d", 2)
        promoter = spawn.Process(target=_promote, args=(v2, stamps))
        promoter.start()
        promoter.join(90)
        assert promoter.exitcode == 0, f"promote failed in its process (exit {promoter.exitcode})"
        asked_at, promoted_at = stamps[0], stamps[1]
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
    # No stall: the longest wait between two answers around the swap (the new version's loading and
    # warm-up included), against the same measure before the promotion. The goal is < 0.2 s; on a
    # shared, loaded 2-core machine a request of 2 tokens itself sometimes takes longer, so the bound
    # asserted is relative to the steady state and absolute at 1 s (it was 2.5-5 s).
    times = sorted(t for t, _, _, _ in answers)
    steady = [b - a for a, b in itertools.pairwise(times) if b < asked_at]
    during = [b - a for a, b in itertools.pairwise(times) if asked_at <= b <= first_new + 2.0]
    # Reported, not asserted: on this shared machine /livez (a constant answer) also takes > 1 s at times
    # with no swap near, while the answers around it keep coming.
    slowest_livez = max((d for s, d in livez if s >= asked_at - 0.5), default=0.0)
    worst = max((b - a, b) for a, b in itertools.pairwise(times) if asked_at <= b <= first_new + 2.0)
    print(f"the longest gap ended {worst[1] - promoted_at:+.2f} s after promotion")
    print(
        f"hot swap: longest gap between answers {max(during) * 1000:.0f} ms during the swap, "
        f"{max(steady) * 1000:.0f} ms before; slowest /livez {slowest_livez * 1000:.0f} ms; "
        f"v2 first answered {first_new - promoted_at:.2f} s after promotion"
    )
    assert max(during) < max(1.0, 2 * max(steady)), f"generation stalled {max(during):.2f}s during the swap"


def test_recalibration_tag_rescales_confidence_live_and_is_logged(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    """The monitor's recalibrate response tags the Production version; the service applies the
    temperature without a reload, and logs the calibrated confidence for the next feedback join."""
    from lockgate.bentos.model_resolver import CALIBRATION_TAG
    from lockgate.bentos.request_log import RequestLog

    name = f"calib-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="calibration-test"):
        v1 = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        registry.promote_first_production(v1, "test")
    log_path = tmp_path / "requests.sqlite"
    [service] = start_services(
        [
            {
                "target": "lockgate.bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": f"models:/{name}/Production",
                "request_log": log_path,
                "log_dir": tmp_path / "logs",
                "registry_poll_s": 0.3,
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
