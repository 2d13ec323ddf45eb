"""Automatic responses against a real MLflow registry (SQLite store), a real HTTP alert receiver, a
real Prefect API (retrain through a deployment) and a real subprocess (retrain without one)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from lockgate.flows.spec import (
    AlertingSpec,
    FeedbackSpec,
    ResponseRule,
    ResponsesSpec,
    ThrottleSpec,
    WebhookSpec,
)
from lockgate.tasks.monitoring.alerting import Alerter
from lockgate.tasks.monitoring.feedback import evaluate_feedback
from lockgate.tasks.monitoring.responses import (
    TAG_TEMPERATURE,
    Responder,
    ResponseContext,
    ResponseLedger,
    recalibrate,
    start_retrain,
)
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.errors import RegistryError


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def alert_names(self) -> list[str]:
        return [b["alerts"][0]["labels"]["alertname"] for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def model_name(tracking: str) -> str:
    return f"resp-{uuid.uuid4().hex[:8]}"


def _register(folder: Path, name: str, role: str) -> registry.ModelVersionRef:
    with mlflow.start_run(run_name=f"test-{role}"):
        return registry.log_model_version(folder, name, {"lockgate.role": role})


def _production(name: str) -> str | None:
    ref = registry.version_in_stage(name, "Production")
    return ref.version if ref else None


def _responder(tmp_path: Path, receiver: Receiver, **rules: ResponseRule) -> Responder:
    alerting = AlertingSpec(webhook=WebhookSpec(url=receiver.url), throttle=ThrottleSpec(max_alerts=100))
    state = tmp_path / "state.sqlite"
    return Responder(
        ResponsesSpec(**rules), ResponseLedger(state), Alerter(alerting, state, tmp_path / "spool")
    )


def _context(tmp_path: Path, model: str, **kwargs: object) -> ResponseContext:
    return ResponseContext(
        pipeline="demo",
        model=model,
        spec_path=tmp_path / "pipelines.yaml",
        out_dir=tmp_path / "report",
        log_dir=tmp_path / "logs",
        **kwargs,  # type: ignore[arg-type]
    )


def _two_productions(
    tiny_llm_dir: Path, name: str
) -> tuple[registry.ModelVersionRef, registry.ModelVersionRef]:
    base = _register(tiny_llm_dir, name, "baseline")
    registry.promote_first_production(base, "first")
    cand = _register(tiny_llm_dir, name, "candidate")
    registry.promote(cand, "canary passed")
    return base, cand


def test_rollback_restores_previous_production(
    tmp_path: Path, tiny_llm_dir: Path, model_name: str, receiver: Receiver
) -> None:
    base, cand = _two_productions(tiny_llm_dir, model_name)
    responder = _responder(
        tmp_path, receiver, data_drift=ResponseRule(action="rollback", severity="critical")
    )
    outcome = responder.respond("data_drift", True, _context(tmp_path, model_name), "drift share 0.90")
    assert outcome.outcome == "acted", outcome.reason
    assert outcome.detail == {"restored": base.version, "demoted": cand.version}
    assert _production(model_name) == base.version
    # The champion alias moved with the stage (MLflow webhooks and @champion URIs see the rollback).
    champion = mlflow.MlflowClient().get_model_version_by_alias(model_name, registry.CHAMPION_ALIAS)
    assert str(champion.version) == base.version
    event = registry.history(model_name)[-1]
    assert (event.version, event.to_stage, event.trigger) == (cand.version, "Archived", "lockgate-monitor")
    (body,) = receiver.bodies
    assert body["alerts"][0]["labels"]["severity"] == "critical"
    assert "-> rollback" in body["alerts"][0]["annotations"]["summary"]


def test_fallback_promotes_the_aliased_version_and_can_be_undone(
    tmp_path: Path, tiny_llm_dir: Path, model_name: str, receiver: Receiver
) -> None:
    _, cand = _two_productions(tiny_llm_dir, model_name)
    responder = _responder(tmp_path, receiver, concept_drift=ResponseRule(action="fallback"))
    missing = responder.respond("concept_drift", True, _context(tmp_path, model_name), "accuracy fell")
    assert missing.outcome == "failed" and "alias 'fallback'" in missing.reason
    assert _production(model_name) == cand.version  # nothing moved
    assert "FAILED" in receiver.bodies[-1]["alerts"][0]["annotations"]["summary"]  # humans still hear of it

    safe = _register(tiny_llm_dir, model_name, "safe-small")
    mlflow.MlflowClient().set_registered_model_alias(model_name, "fallback", safe.version)
    # A failed action does not start the cool-down: the next firing run acts.
    outcome = responder.respond("concept_drift", True, _context(tmp_path, model_name), "accuracy fell")
    assert outcome.outcome == "acted", outcome.reason
    assert _production(model_name) == safe.version
    info = registry.describe_version(safe)
    assert info.tags[registry.TAG_DECISION] == "fallback"
    assert info.tags[registry.TAG_PREVIOUS] == cand.version
    restored, _ = registry.roll_back_production(model_name, "incident over")  # `lockgate rollback`
    assert restored == cand


def test_recalibrate_tags_production_with_fitted_temperature(
    tmp_path: Path, tiny_llm_dir: Path, model_name: str, receiver: Receiver
) -> None:
    parent = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(parent, "first")
    # A released candidate, tagged as the release tags it (tasks/register.py): candidate, recipe, gates,
    # then staged and promoted (decision, reason, trigger, previous production): 7 tags before this.
    with mlflow.start_run(run_name="test-candidate"):
        base = registry.log_model_version(
            tiny_llm_dir,
            model_name,
            {registry.TAG_CANDIDATE: "int8", "lockgate.recipe": "quantize", "lockgate.gates": "passed"},
        )
    registry.stage_candidate(base, "gates passed")
    registry.promote(base, "canary passed")
    assert len(registry.describe_version(base).tags) == 7
    rng = np.random.default_rng(7)
    n = 300
    requests = pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "ts": np.arange(n), "status": "ok"})
    requests["output"] = None
    feedback = pd.DataFrame(
        {
            "request_id": requests["request_id"],
            "label": "",
            "confidence": rng.uniform(0.85, 1.0, size=n),
            "correct": (rng.uniform(size=n) < 0.55).astype(float),
        }
    )
    result = evaluate_feedback(feedback, requests, FeedbackSpec())
    assert result.calibration_drift
    responder = _responder(tmp_path, receiver, calibration=ResponseRule(action="recalibrate"))
    outcome = responder.respond(
        "calibration",
        True,
        _context(tmp_path, model_name, feedback=result),
        f"ECE {result.calibration.ece:.2f}",
    )
    assert outcome.outcome == "acted", outcome.reason
    info = registry.describe_version(base)
    temperature = float(info.tags[TAG_TEMPERATURE])
    assert temperature > 1.0  # over-confident: softened
    assert len(info.tags) <= registry.MAX_VERSION_TAGS, info.tags
    saved = json.loads((tmp_path / "report" / "calibration.json").read_text())
    assert saved["version"] == base.version and saved["temperature"] == pytest.approx(temperature, rel=1e-5)
    assert saved["ece_after"] < saved["ece_before"]
    # The evidence the tags no longer hold is in the version's description, after its decisions.
    description = mlflow.MlflowClient().get_model_version(model_name, base.version).description
    assert description.index("### Decisions") < description.index("### Calibration")
    fitted = f"temperature **{info.tags[TAG_TEMPERATURE]}** fitted on {saved['n']} labelled answers: ECE "
    assert fitted + f"{saved['ece_before']:.4f} → {saved['ece_after']:.4f}" in description

    # A second recalibration (past the responder's cool-down) overwrites the temperature: still within
    # the limit, both in the description.
    recalibrate(model_name, result, tmp_path / "again")
    after = registry.describe_version(base)
    assert len(after.tags) == len(info.tags) and float(after.tags[TAG_TEMPERATURE]) != temperature
    description = mlflow.MlflowClient().get_model_version(model_name, base.version).description
    assert description.count("fitted on") == 2


def test_set_tags_refuses_a_ninth_tag_and_sets_none(tiny_llm_dir: Path, model_name: str) -> None:
    ref = _register(tiny_llm_dir, model_name, "baseline")
    registry.set_tags(ref, {f"lockgate.k{i}": "v" for i in range(7)})  # 8 with the role
    with pytest.raises(RegistryError, match=r"9 tags on a version \(adding lockgate.extra\); at most 8"):
        registry.set_tags(ref, {"lockgate.k0": "changed", "lockgate.extra": "v"})
    tags = registry.describe_version(ref).tags
    assert len(tags) == 8 and tags["lockgate.k0"] == "v"
    registry.set_tags(ref, {"lockgate.k0": "changed"})  # overwriting is no new tag
    assert registry.describe_version(ref).tags["lockgate.k0"] == "changed"


def test_retrain_without_deployment_starts_lockgate_run(tmp_path: Path) -> None:
    spec = tmp_path / "pipelines.yaml"
    # An empty pipelines map: the real `lockgate run` starts, reads the spec and exits 2 at once, which
    # proves the command line without running a whole release here.
    spec.write_text("version: 1\npipelines: {}\n")
    run = start_retrain("demo", spec, tmp_path / "logs", use_deployment=False)
    assert run.kind == "subprocess" and run.log_path is not None
    pid = int(run.ref)
    deadline = time.monotonic() + 120
    while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGTERM)  # our own child's session, by id
            os.waitpid(pid, 0)
            pytest.fail("lockgate run did not exit on an empty spec")
        time.sleep(0.2)
    assert os.waitstatus_to_exitcode(status[1]) == 2  # SpecError's exit code
    text = run.log_path.read_text()
    assert text.startswith(f"{Path(sys.executable).with_name('lockgate')} run demo --file {spec}")
    assert "pipelines" in text  # lockgate's own spec error, from the child


def test_retrain_through_prefect_deployment(tmp_path: Path, prefect_harness: None) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    pipeline = f"p{uuid.uuid4().hex[:6]}"

    @flow(name="release")
    def release(spec_path: str, pipeline: str | None = None) -> None:
        """Stands in for flows.release: only the deployment's name and parameters matter here."""

    deployment_id = release.to_deployment(name=f"{pipeline}-release").apply()
    spec = tmp_path / "pipelines.yaml"
    run = start_retrain(pipeline, spec, tmp_path / "logs")
    assert run.kind == "deployment"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run.ref)
    assert flow_run.deployment_id == deployment_id
    assert flow_run.parameters == {"spec_path": str(spec), "pipeline": pipeline}
    assert "retrain" in flow_run.tags


def test_damping_needs_evidence_and_cools_down_across_restarts(
    tmp_path: Path, tiny_llm_dir: Path, model_name: str, receiver: Receiver
) -> None:
    base, cand = _two_productions(tiny_llm_dir, model_name)
    rule = ResponseRule(action="rollback", min_evidence=2, cooldown_minutes=30)
    ctx = _context(tmp_path, model_name)
    t0 = 1_000_000.0

    def run(fired: bool | None, at: float) -> str:
        # A fresh Responder each time: the monitor is a new process on every scheduled run.
        return (
            _responder(tmp_path, receiver, data_drift=rule)
            .respond("data_drift", fired, ctx, "x", now=at)
            .outcome
        )

    assert run(True, t0) == "waiting_for_evidence"
    assert run(False, t0 + 60) == "quiet"  # a quiet run resets the evidence
    assert run(True, t0 + 120) == "waiting_for_evidence"
    assert run(None, t0 + 150) == "quiet"  # undetermined (too few rows): neither for nor against
    assert _production(model_name) == cand.version
    assert run(True, t0 + 180) == "acted"
    assert _production(model_name) == base.version
    # Still drifting: no second rollback (it would demote the restored version too) while cooling down.
    assert run(True, t0 + 240) == "cooling_down"
    assert run(True, t0 + 1800) == "cooling_down"
    assert _production(model_name) == base.version
    actions = ResponseLedger(tmp_path / "state.sqlite").actions("demo")
    assert [(d, a, ok) for d, a, _, ok, _ in actions] == [("data_drift", "rollback", True)]
    assert receiver.alert_names() == ["DataDrift"]
