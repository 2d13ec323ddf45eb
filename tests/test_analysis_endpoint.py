"""The analysis endpoint Argo's AnalysisTemplate asks (tasks/release/analysis_endpoint.py): pass / fail /
inconclusive for a version pair, from live rows in the routers' per-replica logs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from starlette.testclient import TestClient

from lockgate.bentos.live_log import LiveLog, replica_log_path
from lockgate.bentos.live_store import SqliteLiveStore
from lockgate.bentos.rollout import LiveRow
from lockgate.flows.spec import CanarySpec
from lockgate.tasks.release.analysis_endpoint import create_app

SPEC = CanarySpec(min_canary_requests=30)


def _write(directory: Path, version: str, role: str, n: int, error_rate: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    log = LiveLog(replica_log_path(directory, f"r{seed % 2}"))
    now = time.time()
    rows = []
    for i in range(n):
        ok = bool(rng.random() >= error_rate)
        rows.append(
            LiveRow(
                ts=now - 60 + i * 0.01,
                request_id=f"{version}-{i}",
                replica=f"r{seed % 2}",
                model_name="m",
                version=version,
                role=role,  # type: ignore[arg-type]
                sticky=True,
                user_hash=None,
                outcome="ok" if ok else "failover",
                arm_ok=ok,
                status_code=200 if ok else 500,
                latency_ms=float(20 * np.exp(0.2 * rng.standard_normal())),
                total_ms=20.0,
                answered_version=version,
                output_tokens=4 if ok else None,
                empty=False if ok else None,
            )
        )
    log.append_many(rows)
    log.close()


def test_verdicts_for_a_version_pair(tmp_path: Path) -> None:
    _write(tmp_path, "1", "stable", 400, 0.0, seed=1)
    _write(tmp_path, "2", "canary", 200, 0.0, seed=2)  # good, on the other replica's file
    _write(tmp_path, "3", "canary", 200, 0.3, seed=3)  # fails 30 %
    _write(tmp_path, "4", "canary", 12, 0.0, seed=4)  # too little traffic
    client = TestClient(create_app(SPEC, SqliteLiveStore(tmp_path)))

    def ask(canary: str) -> dict:
        answer = client.get(
            "/analysis", params={"model": "m", "stable": "1", "canary": canary, "window_s": 600}
        )
        assert answer.status_code == 200
        return answer.json()

    good = ask("2")
    assert good["verdict"] == "pass" and good["canary_requests"] == 200 and good["stable_requests"] == 400
    bad = ask("3")
    assert bad["verdict"] == "fail" and "error" in bad["message"]
    waiting = ask("4")
    assert (
        waiting["verdict"] == "inconclusive"
        and waiting["message"] == "waiting for traffic: 12/30 canary requests"
    )
    # outside the window nothing counts
    old = client.get("/analysis", params={"model": "m", "stable": "1", "canary": "2", "window_s": 1}).json()
    assert old["canary_requests"] == 0 and old["verdict"] == "inconclusive"
    missing = client.get("/analysis", params={"model": "m", "stable": "1"})
    assert missing.status_code == 422 and "canary" in missing.json()["error"]
    assert (
        client.get(
            "/analysis", params={"model": "m", "stable": "1", "canary": "2", "window_s": "x"}
        ).status_code
        == 422
    )
