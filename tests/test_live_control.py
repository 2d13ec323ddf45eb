"""Operator commands of a live canary against a real registry, without services: `canary watch` shows
the registry's step/share and every replica's live requests per arm; pause/approve refuse when there
is nothing to act on; `canary abort` with no worker alive rolls the candidate back itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import run_cli
from live_support import live_model, running_step
from lockgate.bentos.live_log import LiveLog, replica_log_path
from lockgate.bentos.rollout import (
    LiveRow,
)
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release.live import live_dir


def _row(model: str, version: str, role: str, replica: str, ok: bool) -> LiveRow:
    return LiveRow(
        ts=time.time(),
        request_id="-",
        replica=replica,
        model_name=model,
        version=version,
        role=role,  # type: ignore[arg-type]
        sticky=True,
        user_hash=None,
        outcome="ok" if ok else "failover",
        arm_ok=ok,
        status_code=200 if ok else 500,
        latency_ms=10.0,
        total_ms=10.0,
        answered_version=version,
    )


def test_watch_and_abort_without_a_worker(tiny_llm_dir: Path, tracking: str) -> None:
    name, refs = live_model(tiny_llm_dir)
    assert run_cli("canary", "pause", name).returncode == 1  # nothing in progress
    running_step(name, time.time() - 1)
    for replica in ("a", "b"):
        log = LiveLog(replica_log_path(live_dir(name), replica))
        log.append_many(
            [
                _row(name, "1", "stable", replica, True),
                _row(name, "2", "canary", replica, False),
                _row(name, "2", "canary", replica, True),
            ]
        )
        log.close()
    watched = run_cli("canary", "watch", name, "--once", "--json")
    assert watched.returncode == 0, watched.stderr
    snapshot = json.loads(watched.stdout)
    assert (snapshot["step"], snapshot["share"], snapshot["state"]) == ("2/4", 25.0, "running")
    assert snapshot["arms"]["canary"]["requests"] == 4 and snapshot["arms"]["canary"]["errors"] == 2
    assert snapshot["arms"]["stable"]["requests"] == 2 and snapshot["arms"]["canary"]["failovers"] == 2
    assert run_cli("canary", "approve", name).returncode == 1  # not waiting for approval

    aborted = run_cli("canary", "abort", name, "--reason", "no worker here", "--wait-s", "0.5")
    assert aborted.returncode == 0, aborted.stderr
    assert registry.describe_version(refs[1]).stage == "Archived"
    assert registry.version_in_stage(name, "Production") == refs[0]
    assert registry.rollout_tags(name) == {} and not registry.read_rollout(name).routing
    actions = {e.action: e for e in registry.history(name) if e.action}
    assert actions["canary_abort"].reason == "no worker here"
    assert any(e.to_stage == "Archived" and "no worker here" in e.reason for e in registry.history(name))
