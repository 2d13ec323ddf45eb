"""The live canary (tasks/release/live.py) on the users' traffic through two router replicas and real
per-version services: promotion, rollback with zero failed user requests, operator abort, pause and
resume, approval surviving a restarted worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import live_support
from conftest import REPO_ROOT, run_cli
from live_support import live_model, routers, wait_for
from lockgate.bentos.live_log import read_live_rows
from lockgate.bentos.rollout import TAG_STATE, TAG_STEP
from lockgate.flows.spec import CanarySpec
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release.live import choose_traffic, live_canary, live_dir, promote_and_watch
from lockgate.tasks.release.live_traffic import UserTraffic
from lockgate.tasks.release.outcome import CanaryResult

pytestmark = pytest.mark.slow
live_services = live_support.live_services  # the module-scoped services fixture

#: The services under test are single-threaded tiny models on a shared CPU: at the 100 % step the candidate
#: carries all the load its stable twin shared, and queueing shows as latency. These tests are about
#: routing and decisions; latency sensitivity is measured by bench/bench_live_canary.py.
LENIENT = {"max_latency_ratio": 20.0, "max_latency_p95_ratio": 20.0, "max_ttft_ratio": 20.0}
RATE = 15


def _spec(**overrides: object) -> CanarySpec:
    base = {
        "traffic": "live",
        "steps": [{"share": 20, "min_requests": 25}, {"share": 50, "min_requests": 25}, 100],
        "min_canary_requests": 25,
        "thresholds": LENIENT,
        "live": {"settle_s": 1.0, "max_wait_s": 120, "read_interval_s": 0.25},
    }
    return CanarySpec.model_validate({**base, **overrides})


def _stage(name: str) -> str:
    return registry.describe_version(registry.ModelVersionRef(name, "2")).stage


def _never_back(records: list) -> None:
    """No sticky user is answered by the old version after the new one answered them."""
    moved: set[str] = set()
    for r in sorted(records, key=lambda r: r.sent_at):
        if r.user_id is None or r.failover:
            continue
        if r.version == "2":
            moved.add(r.user_id)
        assert not (r.user_id in moved and r.version == "1"), f"{r.user_id} moved back to stable"


def test_good_candidate_is_promoted_on_live_traffic(live_services: dict, tiny_llm_dir: Path) -> None:
    name, refs = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    with routers(name, backends, live_dir(name), replicas=2) as replicas:
        traffic = UserTraffic(
            [r.url for r in replicas], users=300, rate_per_s=RATE, anonymous_share=0.3
        ).start()
        mode, why = choose_traffic(CanarySpec(), name)  # the release's default: live while routers run
        assert mode == "live" and "2 replica(s)" in why
        try:
            result = live_canary(refs[0], refs[1], _spec(), "test", "test: live")
            time.sleep(2)  # requests after promotion: answered by v2 as Production
        finally:
            records = traffic.stop()
    mode, why = choose_traffic(CanarySpec(), name)
    assert mode == "replay" and "no production router" in why
    assert result.decision == "promote", result.reason
    assert [s.verdict for s in result.steps] == ["pass", "pass", "pass"]
    assert registry.version_in_stage(name, "Production") == refs[1]
    assert registry.rollout_tags(name) == {}, "rollout tags cleared: routers back to Production only"
    assert [r for r in records if r.failed] == []
    _never_back(records)
    rows = read_live_rows(live_dir(name), name)
    assert {row.replica for row in rows} == {"r0", "r1"}, "the analysis read both replicas"
    assert result.details["traffic"] == "live" and result.details["live_canary_requests"] >= 75
    actions = [e.action for e in registry.history(name) if e.action]
    assert actions.count("canary_step") == 3 and "canary_promote" in actions


def test_failing_candidate_rolled_back_with_zero_failed_user_requests(
    live_services: dict, tiny_llm_dir: Path
) -> None:
    name, refs = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["flaky"]}
    with routers(name, backends, live_dir(name), replicas=2) as replicas:
        traffic = UserTraffic(
            [r.url for r in replicas], users=300, rate_per_s=RATE, anonymous_share=0.3
        ).start()
        try:
            result = live_canary(refs[0], refs[1], _spec(), "test", "test: live")
            decided = time.time()
            time.sleep(2)
        finally:
            records = traffic.stop()
    assert result.decision == "rollback", result.reason
    assert "error_rate" in result.reason or "success_floor" in result.reason
    assert _stage(name) == "Archived" and registry.version_in_stage(name, "Production") == refs[0]
    assert [r for r in records if r.failed] == [], "zero failed user requests"
    assert any(r.failover for r in records)
    took = result.details["first_canary_request_to_decision_s"]
    print(
        f"first canary request -> rollback: {took}s, {result.details['live_canary_requests']} canary requests"
    )
    assert 0 < float(took) < 120
    late = [r for r in records if r.sent_at > decided + 1.0]  # routers poll every 0.5 s
    assert late and all(r.version == "1" for r in late), "after the rollback only Production answers"


def _run_in_thread(target, *args):
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = target(*args)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_abort_pause_and_resume(live_services: dict, tiny_llm_dir: Path) -> None:
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    # pause / resume: the step is held while paused and continues (same step) after resume
    name, refs = live_model(tiny_llm_dir)
    spec = _spec(steps=[{"share": 50, "min_requests": 250}, 100])
    with routers(name, backends, live_dir(name), replicas=1) as replicas:
        traffic = UserTraffic([replicas[0].url], users=200, rate_per_s=RATE).start()
        try:
            thread, box = _run_in_thread(live_canary, refs[0], refs[1], spec, "test", "test")
            wait_for(lambda: registry.rollout_tags(name).get(TAG_STATE) == "running", 30, "canary running")
            paused = run_cli("canary", "pause", name)
            assert paused.returncode == 0, paused.stderr
            time.sleep(10)
            tags = registry.rollout_tags(name)
            assert tags[TAG_STATE] == "paused" and tags[TAG_STEP] == "1/2" and thread.is_alive()
            assert "paused" in tags["lockgate.rollout.note"]
            resumed = run_cli("canary", "resume", name)
            assert resumed.returncode == 0, resumed.stderr
            thread.join(120)
        finally:
            traffic.stop()
    assert "error" not in box, box.get("error")
    assert box["result"].decision == "promote" and len(box["result"].steps) == 2

    # abort mid-step: Production only within 5 s, the reason recorded
    name, refs = live_model(tiny_llm_dir)
    spec = _spec(steps=[{"share": 50, "min_requests": 5000}, 100], max_requests_per_step=10_000)
    with routers(name, backends, live_dir(name), replicas=2) as replicas:
        traffic = UserTraffic([r.url for r in replicas], users=200, rate_per_s=RATE).start()
        try:
            thread, box = _run_in_thread(live_canary, refs[0], refs[1], spec, "test", "test")
            wait_for(
                lambda: "canary requests" in registry.rollout_tags(name).get("lockgate.rollout.note", ""),
                30,
                "step",
            )
            asked = time.time()
            aborted = run_cli("canary", "abort", name, "--reason", "latency complaints from support")
            assert aborted.returncode == 0, aborted.stderr
            wait_for(
                lambda: all(not r.rollout()["routing"] for r in replicas), 10, "routers on Production only"
            )
            off = time.time() - asked
            time.sleep(1.5)
            thread.join(30)
        finally:
            records = traffic.stop()
    events = registry.history(name)
    abort = [e for e in events if e.action == "canary_abort"]
    recorded = abort[0].time_ms / 1000  # when the abort command reached the registry
    since_recorded = asked + off - recorded
    print(
        f"abort: Production only {off:.2f}s after the command started, {since_recorded:.2f}s after recorded"
    )
    assert since_recorded <= 5
    assert box["result"].decision == "rollback" and "latency complaints" in box["result"].reason
    assert _stage(name) == "Archived"
    late = [r for r in records if r.sent_at > asked + off + 0.5]  # sent after both routers reported
    assert late and all(r.version == "1" for r in late)
    assert abort[0].reason == "latency complaints from support" and abort[0].trigger.startswith("cli:")
    assert [r for r in records if r.failed] == []


def _worker(name: str, spec_file: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as sink:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lockgate.flows.cli",
                "canary",
                "start",
                name,
                "--version",
                "2",
                "--canary-spec",
                str(spec_file),
            ],
            cwd=REPO_ROOT,
            env=os.environ.copy(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_approval_waits_and_survives_a_worker_restart(
    live_services: dict, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    name, refs = live_model(tiny_llm_dir)
    spec_file = tmp_path / "canary.yaml"
    spec = _spec(steps=[{"share": 30, "min_requests": 20}, 100], require_approval=True)
    spec_file.write_text(yaml.safe_dump(json.loads(spec.model_dump_json())))
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    log = tmp_path / "worker.log"
    with routers(name, backends, live_dir(name), replicas=1) as replicas:
        traffic = UserTraffic([replicas[0].url], users=200, rate_per_s=RATE).start()
        worker = _worker(name, spec_file, log)
        try:
            waiting = lambda: registry.rollout_tags(name).get(TAG_STATE) == "awaiting_approval"  # noqa: E731
            wait_for(waiting, 90, "the approval wait")
            os.killpg(worker.pid, signal.SIGKILL)  # the worker dies while waiting
            worker.wait(10)
            worker = _worker(name, spec_file, log)
            time.sleep(8)  # the restarted worker keeps waiting: nothing promoted without approval
            assert worker.poll() is None and waiting() and _stage(name) == "Staging"
            approved = run_cli("canary", "approve", name)
            assert approved.returncode == 0, approved.stderr
            assert worker.wait(120) == 0, log.read_text()[-3000:]
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
            traffic.stop()
    assert registry.version_in_stage(name, "Production") == refs[1]
    approve = [e for e in registry.history(name) if e.action == "canary_approve"]
    assert len(approve) == 1 and approve[0].trigger.startswith("cli:") and "approved at" in approve[0].reason


def test_post_promotion_watch_rolls_a_regressing_production_back(
    live_services: dict, tiny_llm_dir: Path
) -> None:
    """After promotion the previous version keeps serving baseline_share % of users; a new Production
    failing 20 % is judged against it on live traffic and the previous version restored at once."""
    name, refs = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["flaky"]}
    spec = _spec(post_promotion={"watch_minutes": 2, "baseline_share": 30})
    with routers(name, backends, live_dir(name), replicas=2) as replicas:
        traffic = UserTraffic([r.url for r in replicas], 300, RATE, anonymous_share=0.3).start()
        try:
            started = time.monotonic()
            passed = CanaryResult((), "promote", "test: canary passed")
            result = promote_and_watch(refs[0], refs[1], spec, "test", passed)
            took = time.monotonic() - started
            time.sleep(2)
        finally:
            records = traffic.stop()
    assert result.decision == "rollback" and "post-promotion watch" in result.reason, result.reason
    assert took < 60, "a regression is rolled back at once, not at the end of the watch"
    assert registry.version_in_stage(name, "Production") == refs[0]
    assert registry.rollout_tags(name) == {}
    served = {r.version for r in records if not r.failover}
    assert served == {"1", "2"}, "the previous version served its baseline share during the watch"
    assert [r for r in records if r.failed] == []
    actions = [e.action for e in registry.history(name) if e.action]
    assert "watch_start" in actions and "watch_rollback" in actions
