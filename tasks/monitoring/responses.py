"""Automatic responses to monitor detectors (spec ``monitor.responses``), damped so they cannot flap.

Per detector the spec names one action:

* ``alert``: notify only (every other action alerts too, so a human always hears of it);
* ``rollback``: Production goes back to the version it replaced (:func:`registry.roll_back_production`);
  services that serve ``models:/NAME/Production`` or ``@production`` follow within one registry poll;
* ``fallback``: the version under the spec's ``fallback_alias`` becomes Production through
  :func:`registry.promote` (decision ``fallback``; it records the replaced version, so ``lockgate
  rollback`` undoes it) — the same registry-following mechanism, no change to the service;
* ``retrain``: a release-flow run: the Prefect deployment ``release/<pipeline>-release`` when one
  exists (``lockgate deploy``), else a detached ``lockgate run <pipeline>`` subprocess;
* ``recalibrate``: a temperature fitted on feedback confidences, tagged on the Production version
  (``lockgate.calibration.temperature``) and logged as an MLflow artifact.

Damping, persisted in SQLite under the lockgate home so it survives restarts: an action runs only
after ``min_evidence`` consecutive runs in which its detector fired, and not again within
``cooldown_minutes`` of its last run for the same pipeline and detector.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lockgate.bentos.model_resolver import CALIBRATION_TAG, parse_temperature
from lockgate.tasks.monitoring.alerting import Alert, Alerter, AlertOutcome, state_db
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.errors import LockgateError, RegistryError
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from lockgate.flows.spec import Detector, ResponseRule, ResponsesSpec
    from lockgate.tasks.monitoring.feedback import FeedbackResult

log = get_logger(__name__)
TRIGGER = "lockgate-monitor"
TAG_TEMPERATURE = CALIBRATION_TAG
#: The section of a version's description that lists its recalibrations.
CALIBRATION_HEADER = "### Calibration"
Outcome = Literal["acted", "alerted", "waiting_for_evidence", "cooling_down", "quiet", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS detections (
    pipeline TEXT NOT NULL, detector TEXT NOT NULL, ts REAL NOT NULL, fired INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_key ON detections (pipeline, detector, ts);
CREATE TABLE IF NOT EXISTS actions (
    pipeline TEXT NOT NULL, detector TEXT NOT NULL, action TEXT NOT NULL, ts REAL NOT NULL,
    ok INTEGER NOT NULL, detail TEXT
);
CREATE INDEX IF NOT EXISTS actions_key ON actions (pipeline, detector, ts);
"""


class ResponseFailed(LockgateError):
    """An automatic response could not be carried out (the alert about it was still sent)."""


# ------------------------------------------------------------------------------------------ damping
@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str
    consecutive: int


class ResponseLedger:
    """Detections and actions per (pipeline, detector), in the monitor's SQLite state file."""

    def __init__(self, db: Path) -> None:
        self.db = db
        with state_db(db) as conn:
            conn.executescript(_SCHEMA)

    def record(self, pipeline: str, detector: str, fired: bool, now: float) -> int:
        """Store this run's verdict; return how many consecutive runs (this one included) fired."""
        with state_db(self.db) as conn:
            conn.execute("INSERT INTO detections VALUES (?, ?, ?, ?)", (pipeline, detector, now, int(fired)))
            last_quiet = conn.execute(
                "SELECT MAX(ts) FROM detections WHERE pipeline = ? AND detector = ? AND fired = 0",
                (pipeline, detector),
            ).fetchone()[0]
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM detections "
                "WHERE pipeline = ? AND detector = ? AND fired = 1 AND ts > ?",
                (pipeline, detector, -1.0 if last_quiet is None else last_quiet),
            ).fetchone()
        return int(count)

    def last_action(self, pipeline: str, detector: str) -> float | None:
        with state_db(self.db) as conn:
            row = conn.execute(
                "SELECT MAX(ts) FROM actions WHERE pipeline = ? AND detector = ? AND ok = 1",
                (pipeline, detector),
            ).fetchone()
        return row[0]

    def log_action(
        self, pipeline: str, detector: str, action: str, now: float, ok: bool, detail: str
    ) -> None:
        with state_db(self.db) as conn:
            conn.execute(
                "INSERT INTO actions VALUES (?, ?, ?, ?, ?, ?)",
                (pipeline, detector, action, now, int(ok), detail),
            )

    def actions(self, pipeline: str) -> list[tuple[str, str, float, bool, str]]:
        with state_db(self.db) as conn:
            rows = conn.execute(
                "SELECT detector, action, ts, ok, detail FROM actions WHERE pipeline = ? ORDER BY ts",
                (pipeline,),
            ).fetchall()
        return [(d, a, ts, bool(ok), detail) for d, a, ts, ok, detail in rows]

    def decide(self, pipeline: str, detector: str, fired: bool, rule: ResponseRule, now: float) -> Decision:
        consecutive = self.record(pipeline, detector, fired, now)
        if not fired:
            return Decision(False, "detector quiet", 0)
        if consecutive < rule.min_evidence:
            return Decision(
                False, f"evidence {consecutive}/{rule.min_evidence} consecutive runs", consecutive
            )
        last = self.last_action(pipeline, detector)
        if last is not None and now - last < rule.cooldown_minutes * 60:
            wait = rule.cooldown_minutes * 60 - (now - last)
            return Decision(
                False,
                f"cooling down: last {rule.action} {now - last:.0f}s ago, {wait:.0f}s left",
                consecutive,
            )
        return Decision(True, f"fired in {consecutive} consecutive runs", consecutive)


# ------------------------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class RetrainRun:
    kind: Literal["deployment", "subprocess"]
    ref: str  # flow-run id or process id
    log_path: Path | None = None


def _run_deployment(pipeline: str, spec_path: Path) -> RetrainRun | None:
    """A run of the ``release/<pipeline>-release`` deployment; None when that deployment does not exist."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"release/{pipeline}-release"
    try:
        flow_run = run_deployment(
            name,
            parameters={"spec_path": str(spec_path), "pipeline": pipeline},
            timeout=0,  # scheduled for a worker; the monitor does not wait for a release
            tags=["lockgate-monitor", "retrain"],
            as_subflow=False,
        )
    except ObjectNotFound:
        return None
    return RetrainRun("deployment", str(flow_run.id))


def start_retrain(pipeline: str, spec_path: Path, log_dir: Path, use_deployment: bool = True) -> RetrainRun:
    """Start a release run with fresh data; never waits for it."""
    if use_deployment:
        try:
            run = _run_deployment(pipeline, spec_path)
        except Exception as exc:  # no reachable Prefect API: the subprocess path still works
            log.warning("retrain: Prefect deployment unavailable (%s); starting `lockgate run`", exc)
            run = None
        if run is not None:
            log.warning("retrain: started deployment run %s", run.ref)
            return run
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"retrain-{pipeline}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    lockgate = Path(sys.executable).with_name("lockgate")
    command = [str(lockgate), "run", pipeline, "--file", str(spec_path)]
    with open(log_path, "ab") as out:
        out.write((" ".join(command) + "\n").encode())
        out.flush()
        # A new session: the release outlives the monitor run that started it.
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=spec_path.parent,
            env={**os.environ, "LOCKGATE_TRIGGER": f"{TRIGGER}:retrain"},
            start_new_session=True,
        )
    log.warning("retrain: started `%s` as pid %d (log %s)", " ".join(command), proc.pid, log_path)
    return RetrainRun("subprocess", str(proc.pid), log_path)


def fallback_version(model: str, alias: str) -> registry.ModelVersionRef:
    for info in registry.list_versions(model):
        if alias in info.aliases:
            return registry.ModelVersionRef(model, info.version)
    raise RegistryError(
        f"{model}: no version carries the alias {alias!r} (monitor.responses.fallback_alias); "
        "give the fallback version that alias in the MLflow UI (model version page, Aliases)"
    )


def recalibrate(model: str, feedback: FeedbackResult | None, out_dir: Path) -> dict[str, Any]:
    """Fit a temperature on the feedback confidences; tag the Production version with it."""
    from lockgate.tasks.monitoring.feedback import fit_temperature

    if feedback is None or len(feedback.confidence) < 2:
        raise ResponseFailed("recalibrate needs feedback with a confidence column (feedback.file)")
    production = registry.version_in_stage(model, "Production")
    if production is None:
        raise ResponseFailed(f"recalibrate: {model} has no Production version to calibrate")
    fit = fit_temperature(np.array(feedback.confidence), np.array(feedback.correct))
    # The service logs confidences already scaled by the version's current temperature T0, and
    # σ(logit(σ(logit(p)/T0))/T) = σ(logit(p)/(T0·T)): the new tag is the product.
    current = parse_temperature(registry.get_tags(production).get(TAG_TEMPERATURE))
    temperature = f"{current * fit.temperature:.6g}"
    # One tag, the one the service reads: a released version already carries ~7 and the registry keeps
    # them ≤ MAX_VERSION_TAGS. The evidence goes to its description (and calibration.json).
    registry.set_tags(production, {TAG_TEMPERATURE: temperature})
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    registry.append_to_description(
        production,
        CALIBRATION_HEADER,
        f"- {when} temperature **{temperature}** fitted on {fit.n} labelled answers: ECE "
        f"{fit.ece_before:.4f} → {fit.ece_after:.4f}",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    detail = {"model": model, "version": production.version, **asdict(fit)}
    path = out_dir / "calibration.json"
    path.write_text(json.dumps(detail, indent=2))
    _log_artifact(path, "calibration")
    return detail


def _log_artifact(path: Path, folder: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), folder)


# ----------------------------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class ResponseContext:
    pipeline: str
    model: str  # registered model name
    spec_path: Path
    out_dir: Path  # this monitor run's report folder
    log_dir: Path  # where retrain subprocess logs go
    feedback: FeedbackResult | None = None
    use_deployment: bool = True


@dataclass(frozen=True)
class ResponseOutcome:
    detector: str
    action: str
    outcome: Outcome
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
    alert: AlertOutcome | None = None


def _act(action: str, ctx: ResponseContext, reason: str) -> dict[str, Any]:
    if action == "rollback":
        restored, demoted = registry.roll_back_production(ctx.model, reason, trigger=TRIGGER)
        return {"restored": restored.version, "demoted": demoted.version}
    if action == "retrain":
        run = start_retrain(ctx.pipeline, ctx.spec_path, ctx.log_dir, ctx.use_deployment)
        return {"kind": run.kind, "ref": run.ref, "log": str(run.log_path) if run.log_path else None}
    if action == "recalibrate":
        return recalibrate(ctx.model, ctx.feedback, ctx.out_dir)
    raise ValueError(f"unknown action {action!r}")


class Responder:
    """Runs the spec's response for each detector verdict, through the ledger's damping."""

    def __init__(self, spec: ResponsesSpec, ledger: ResponseLedger, alerter: Alerter) -> None:
        self.spec, self.ledger, self.alerter = spec, ledger, alerter

    def _action(self, action: str, ctx: ResponseContext, reason: str) -> dict[str, Any]:
        if action == "fallback":
            ref = fallback_version(ctx.model, self.spec.fallback_alias)
            old = registry.promote(ref, reason, trigger=TRIGGER, decision="fallback")
            return {"fallback": ref.version, "replaced": old.version if old else None}
        return _act(action, ctx, reason)

    def respond(
        self,
        detector: Detector,
        fired: bool | None,
        ctx: ResponseContext,
        summary: str,
        details: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> ResponseOutcome:
        """``fired`` None (undetermined, e.g. too few rows) is neither evidence for nor against."""
        rule = self.spec.rule(detector)
        now = time.time() if now is None else now
        if fired is None:
            return ResponseOutcome(detector, rule.action, "quiet", "undetermined: not recorded")
        decision = self.ledger.decide(ctx.pipeline, detector, fired, rule, now)
        if not fired:
            return ResponseOutcome(detector, rule.action, "quiet", decision.reason)
        if not decision.act:
            outcome: Outcome = "waiting_for_evidence" if "evidence" in decision.reason else "cooling_down"
            return ResponseOutcome(detector, rule.action, outcome, decision.reason)
        reason = f"monitor {detector}: {summary}"
        detail: dict[str, Any] = {}
        result: Outcome = "alerted" if rule.action == "alert" else "acted"
        error: str | None = None
        if rule.action != "alert":
            try:
                detail = self._action(rule.action, ctx, reason)
            except (LockgateError, OSError, ValueError) as exc:
                error, result = str(exc), "failed"
                log.error("response %s to %s failed: %s", rule.action, detector, exc)
        self.ledger.log_action(
            ctx.pipeline,
            detector,
            rule.action,
            now,
            error is None,
            json.dumps(detail or {"error": error}, default=str),
        )
        name = {
            "data_drift": "DataDrift",
            "concept_drift": "ConceptDrift",
            "calibration": "Miscalibration",
        }.get(detector, "TextQualityDrift")
        verb = "" if rule.action == "alert" else f" -> {rule.action}" + (" FAILED" if error else "")
        alert = self.alerter.fire(
            Alert(
                name,
                rule.severity,
                ctx.pipeline,
                detector,
                f"{summary}{verb}",
                {**(details or {}), "action": rule.action, "result": detail, "error": error},
            ),
            now,
        )
        return ResponseOutcome(detector, rule.action, result, error or decision.reason, detail, alert)
