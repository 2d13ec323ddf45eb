"""Resuming an interrupted canary: checkpoints replay to the same analysis, the persisted state round-
trips, the resume conditions, and a real `lockgate run` killed mid-canary then restarted (slow)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from conftest import REPO_ROOT, tiny_release_spec
from lockgate.bentos.config import ServiceConfig
from lockgate.flows.spec import CanarySpec, PackageSpec
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.analysis import Outcome, Target
from lockgate.tasks.release.canary_strategy import run_steps
from lockgate.tasks.release.lock import LockInfo
from lockgate.tasks.release.recovery import why_not_resumable
from lockgate.tasks.release.state import (
    CanaryState,
    Checkpoint,
    canary_spec_sha256,
    clear_state,
    load_state,
    save_state,
    state_path,
)
from lockgate.tasks.release.strategy import ReleaseRun

SPEC = CanarySpec(steps=(10, 50, 100), min_canary_requests=30, users=97, max_new_tokens=4)
PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee"]


def deterministic_sender(target: Target, prompt: str, user_id: str) -> Outcome:
    """Each answer a pure function of the request: a resumed canary must reproduce the same verdicts."""
    digest = hashlib.sha256(f"{target}|{prompt}|{user_id}".encode()).digest()
    latency = 20.0 + digest[0] / 25.5  # 20-30 ms
    if digest[1] < 3:  # ~1 % errors on both versions
        return Outcome(target, False, latency, 500)
    return Outcome(target, True, latency, 200, output_tokens=4, empty=digest[2] < 2, ttft_ms=latency / 4)


def _without_time(result: object) -> list[dict]:
    steps = [asdict(s) for s in result.steps]  # type: ignore[attr-defined]
    for step in steps:
        step.pop("elapsed_s")
    return json.loads(json.dumps(steps).replace("NaN", "null"))


def test_a_resumed_canary_decides_exactly_as_an_uninterrupted_one() -> None:
    checkpoints: list[Checkpoint] = []
    whole = run_steps(deterministic_sender, PROMPTS, SPEC, verbose=False, on_step=checkpoints.append)
    assert whole.decision == "promote" and len(checkpoints) == len(SPEC.steps)
    assert [len(c.steps) for c in checkpoints] == [1, 2, 3]
    for checkpoint in checkpoints:
        resumed = run_steps(deterministic_sender, PROMPTS, SPEC, verbose=False, checkpoint=checkpoint)
        assert resumed.decision == whole.decision and resumed.canary_requests == whole.canary_requests
        # Same windows and the same evidence: the e-processes were rebuilt from the replayed outcomes.
        assert _without_time(resumed) == _without_time(whole)


def test_a_failed_step_is_never_a_checkpoint() -> None:
    bad = CanarySpec(steps=(50, 100), min_canary_requests=30, users=97)

    def failing(target: Target, prompt: str, user_id: str) -> Outcome:
        return Outcome(target, target == "stable", 10.0, 200 if target == "stable" else 500)

    saved: list[Checkpoint] = []
    result = run_steps(failing, PROMPTS, bad, verbose=False, on_step=saved.append)
    assert result.decision == "rollback" and saved == []
    with pytest.raises(ValueError, match="only passed steps"):
        run_steps(failing, PROMPTS, bad, verbose=False, checkpoint=Checkpoint(result.steps))


def test_state_round_trips_through_its_file(lockgate_home: Path) -> None:
    saved: list[Checkpoint] = []
    run_steps(deterministic_sender, PROMPTS, SPEC, verbose=False, on_step=saved.append)
    model = f"state-{uuid.uuid4().hex[:8]}"
    state = CanaryState(
        ModelVersionRef(model, "1"),
        ModelVersionRef(model, "2"),
        "svc:abc",
        tuple(PROMPTS),
        canary_spec_sha256(SPEC),
        "/tmp/requests.sqlite",
        "/tmp/logs",
        None,
        "run-1",
        saved[1],
        service_config=PackageSpec(limits={"concurrency": 3}).public_json(),
    )
    path = save_state(state)
    assert path == state_path(model) and path.is_file()
    loaded = load_state(model)
    assert loaded is not None
    assert replace(loaded, checkpoint=Checkpoint()) == replace(state, checkpoint=Checkpoint())
    assert loaded.checkpoint.outcomes == state.checkpoint.outcomes
    assert loaded.checkpoint.replayed == state.checkpoint.replayed
    assert _without_time(loaded.checkpoint) == _without_time(state.checkpoint)
    assert any(math.isnan(c.p_value) for s in loaded.checkpoint.steps for c in s.checks)  # NaN survives
    # Every service a strategy starts gets the pipeline's package: settings (not the service defaults).
    launched = ReleaseRun(loaded, SPEC, "test", lambda *_: None).launch["config"]
    assert isinstance(launched, ServiceConfig) and launched.limits.concurrency == 3
    assert clear_state(model) and not clear_state(model) and load_state(model) is None
    path.write_text("{not json")
    assert load_state(model) is None  # unreadable: not resumable (recovery rolls back instead)


def _dead_lock(model: str) -> LockInfo:
    return LockInfo(model, "t", "someone", "host", 1, None, 0.0, 0.0, "canary step 2/3 at 50%", ())


def test_resume_conditions_that_need_no_registry() -> None:
    state = CanaryState(
        ModelVersionRef("m", "1"),
        ModelVersionRef("m", "2"),
        "svc:abc",
        ("p",),
        canary_spec_sha256(SPEC),
        "r",
        "l",
        None,
        None,
    )
    lock = _dead_lock("m")
    rollback = SPEC.model_copy(update={"on_interrupt": "rollback"})
    assert why_not_resumable(state, lock, rollback) == "canary.on_interrupt is rollback"
    assert canary_spec_sha256(rollback) == canary_spec_sha256(SPEC)  # the choice is not the plan
    shadow = CanarySpec(strategy="shadow")
    assert "never resumed" in (why_not_resumable(state, lock, shadow) or "")
    assert "no interrupted release" in (why_not_resumable(state, None, SPEC) or "")
    changed = CanarySpec(steps=(10, 50, 100), min_canary_requests=31, users=97, max_new_tokens=4)
    assert "spec changed" in (why_not_resumable(state, lock, changed) or "")
    assert CanarySpec().on_interrupt == "resume"


# ------------------------------------------------------------------------- end to end (slow)
def _pipeline(tiny_llm_dir: Path, name: str) -> dict:
    canary = {
        "steps": [
            {"share": 20, "min_requests": 5},
            {"share": 50, "min_requests": 10, "duration_s": 20},  # killed in this one
            {"share": 100, "min_requests": 5},
        ],
        "max_requests_per_step": 100000,
        "traffic_per_s": 5,
        "max_new_tokens": 3,
        "users": 97,
        # Two services share two loaded cores: latency is not what this test is about.
        "thresholds": {"max_latency_ratio": 3.0, "max_latency_p95_ratio": 5.0},
    }
    return tiny_release_spec(tiny_llm_dir, name, "resume-test", canary)


def _run(spec_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lockgate.flows.cli", "run", "tiny", "-f", str(spec_path), "--json"],
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


@pytest.mark.slow
def test_release_killed_mid_canary_resumes_after_restart(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    name = f"resume-{uuid.uuid4().hex[:8]}"
    spec_path = tmp_path / "pipelines.yaml"
    spec_path.write_text(yaml.safe_dump(_pipeline(tiny_llm_dir, name), sort_keys=False))
    first = _run(spec_path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and first.poll() is None:
            held = release_lock.current(name)
            if held is not None and held.phase.startswith("canary step 2/3"):
                break
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(2)  # into step 2: some of its requests were answered, none of it is checkpointed
        held = release_lock.current(name)
        assert held is not None and held.phase.startswith("canary step 2/3"), "never reached step 2"
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()

    state = load_state(name)
    assert state is not None and len(state.checkpoint.steps) == 1, "step 1 was not checkpointed"
    assert state.checkpoint.steps[0].verdict == "pass"
    assert {v.version: v.stage for v in registry.list_versions(name)} == {"1": "Production", "2": "Staging"}

    second = _run(spec_path, tmp_path / "second.log")
    out, _ = second.communicate(timeout=540)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode in (0, 3), log[-4000:]
    outcome = json.loads(out.strip().splitlines()[-1])["outcome"]
    assert outcome in ("promoted", "rolled_back"), out
    assert "resuming the canary of v2 after 1 of 3 completed step(s)" in log

    # Registry consistent: no new version (nothing recompressed), exactly one Production, no Staging.
    stages = {v.version: v.stage for v in registry.list_versions(name)}
    expected = (
        {"1": "Archived", "2": "Production"}
        if outcome == "promoted"
        else {"1": "Production", "2": "Archived"}
    )
    assert stages == expected, (outcome, stages)
    assert load_state(name) is None and release_lock.current(name) is None
    assert not any(psutil.pid_exists(pgid) for pgid in held.services)  # orphans stopped
    # The resumed canary is one MLflow run that says where it came from, with all three steps judged
    # (the first from before the kill) unless it rolled back earlier.
    runs = mlflow.search_runs(
        experiment_names=["resume-test"],
        filter_string="tags.`lockgate.canary.resumed_after_steps` = '1'",
        output_format="list",
    )
    assert len(runs) == 1
    decision = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="decision.json")
        ).read_text()
    )
    assert decision["candidate"] == f"models:/{name}/2" and decision["steps"][0]["verdict"] == "pass"
    if outcome == "promoted":
        assert [s["share"] for s in decision["steps"]] == [20, 50, 100]
    print(f"resumed release: {outcome}; {decision['reason']}")
