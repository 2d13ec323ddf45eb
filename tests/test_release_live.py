"""`lockgate run` with a live canary, end to end: a production router serves users from the registry's
Production version; the release compresses and evaluates a candidate, sets its share in the registry,
the router starts the candidate's service and sends it the share of the live users, the release reads
their requests from the router's log, decides, and promotes — no replayed prompt anywhere.

Slow (a whole release plus a router starting two services), run in CI too."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tiny_release_spec
from live_support import spawning_router_env, start_router
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release.live import live_dir
from lockgate.tasks.release.live_traffic import UserTraffic

pytestmark = pytest.mark.slow

LENIENT = {"max_latency_ratio": 20.0, "max_latency_p95_ratio": 20.0, "max_ttft_ratio": 20.0}


def test_lockgate_run_canaries_on_live_users(tmp_path: Path, tiny_llm_dir: Path, tracking: str) -> None:
    import mlflow

    name = f"live-run-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="live-run-baseline"):
        production = registry.log_model_version(tiny_llm_dir, name, {})
    registry.promote_first_production(production, "test baseline")
    env = spawning_router_env(tmp_path)
    router = start_router(name, "r0", None, live_dir(name), ready_timeout_s=240, extra_env=env)
    canary = {
        "traffic": "live",
        "steps": [{"share": 50, "min_requests": 20}, 100],
        "min_canary_requests": 20,
        "thresholds": LENIENT,
        "live": {"settle_s": 1.0, "max_wait_s": 240, "read_interval_s": 0.25},
    }
    spec = tiny_release_spec(tiny_llm_dir, name, f"exp-{name}", canary)
    spec_path = tmp_path / "pipelines.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    traffic = UserTraffic([router.url], users=100, rate_per_s=10).start()
    try:
        done = run_cli("run", "tiny", "-f", str(spec_path), timeout=1500)
    finally:
        records = traffic.stop()
        router.stop()
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert "release tiny -> PROMOTED" in done.stdout, done.stdout[-3000:]
    assert "traffic    live: canary.traffic: live in the spec (1 production router(s) running)" in done.stdout
    assert "live requests, 0 failed" in done.stdout
    candidate = registry.version_in_stage(name, "Production")
    assert candidate is not None and candidate.version != production.version
    # The users were answered throughout, by both versions: the candidate on their live requests.
    assert records and [r for r in records if r.failed] == []
    assert {r.version for r in records} == {production.version, candidate.version}
