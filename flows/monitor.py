"""The monitor flow: validate → detect → report → act, over the last window of served traffic.

The release flow ends with the same monitor task over its canary traffic; this flow is what a
Prefect deployment runs every ``monitor.schedule`` over whatever the services logged since:

1. the request-log window is validated with Great Expectations (a corrupt window fails the run,
   naming the column and expectation);
2. Evidently drift of prompt features vs the reference set and of output features vs a baseline
   window (tasks/monitor.py), feedback-label concept drift and ECE (tasks/monitoring/feedback.py), and the
   output text-quality monitor;
3. the verdicts become Prometheus gauges (textfile), MLflow metrics and artifacts;
4. each detector's response from the spec runs, damped (tasks/monitoring/responses.py), and alerts go through
   the throttled notifier (tasks/monitoring/alerting.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow

from lockgate.flows.spec import PipelineSpec
from lockgate.flows.spec_loader import load_spec
from lockgate.tasks.model_source import resolve_parent
from lockgate.tasks.monitor import DriftResult, TextQualityResult, monitor_task, text_quality_drift
from lockgate.tasks.monitoring.alerting import Alerter, write_gauges
from lockgate.tasks.monitoring.feedback import FeedbackResult, evaluate_feedback, feedback_path, read_feedback
from lockgate.tasks.monitoring.responses import Responder, ResponseContext, ResponseLedger, ResponseOutcome
from lockgate.tasks.monitoring.window import read_window, served_ok
from lockgate.tasks.platform.datasets import load_dataset
from lockgate.tasks.platform.log import run_logger
from lockgate.tasks.platform.settings import Settings, export_environment, get_settings
from lockgate.tasks.platform.tracking import configure_tracking
from lockgate.tasks.validate_data import validate_frame


def request_log_path(pipeline: str) -> Path:
    """Where the services of ``pipeline`` append their request log (shared with the release flow)."""
    return get_settings().request_log_dir / f"{pipeline}.sqlite"


def monitor_state_path(settings: Settings) -> Path:
    """Throttling and damping state: one SQLite file under the lockgate home (survives restarts)."""
    return settings.home / "monitor" / "state.sqlite"


def alert_spool_path(settings: Settings) -> Path:
    """Alerts the webhook did not accept, re-sent first by the next run."""
    return settings.home / "monitor" / "undelivered-alerts.jsonl"


def gauges_path(settings: Settings, pipeline: str) -> Path:
    """The monitor's Prometheus gauges, for node_exporter's textfile collector."""
    return settings.home / "metrics" / f"lockgate-monitor-{pipeline}.prom"


@dataclass(frozen=True)
class MonitorReport:
    pipeline: str
    drift: DriftResult
    feedback: FeedbackResult
    text_quality: TextQualityResult | None
    detectors: dict[str, bool | None]  # None: undetermined this run
    responses: tuple[ResponseOutcome, ...]
    out_dir: Path


def _timestamp(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:]


def _in_flow() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def run_monitor(
    spec_file: Path, name: str, spec: PipelineSpec, now: float | None = None, use_deployment: bool = True
) -> MonitorReport:
    """One monitor pass (the flow's body; callable without Prefect, as the tests do)."""
    import mlflow

    settings = get_settings()
    export_environment(settings)
    logger = run_logger(__name__)
    monitor = spec.monitor
    configure_tracking(spec.tracking.experiment, settings)
    reference = load_dataset("reference", spec.data.reference, spec_file.parent)
    validate_frame("reference", reference, spec.data.max_prompt_chars)
    now = time.time() if now is None else now
    window_s = monitor.window_minutes * 60
    since = now - window_s
    baseline_since = (
        since - monitor.drift.baseline_windows * window_s if monitor.drift.baseline_windows else None
    )
    out_dir = settings.reports_dir / name / "monitor" / _timestamp(now)
    log_path = request_log_path(name)
    with mlflow.start_run(
        run_name=f"monitor-{name}", tags={"lockgate.pipeline": name, "lockgate.flow": "monitor"}
    ) as run:
        # Reference features use the parent's tokenizer: the one every candidate of this pipeline shares.
        parent = resolve_parent(spec.model, settings.cache_dir, settings.demo_train_steps)
        args = (
            log_path,
            since,
            reference["prompt"].astype(str).tolist(),
            parent.folder,
            monitor,
            out_dir,
            run.info.run_id,
            baseline_since,
        )
        drift = monitor_task(*args) if _in_flow() else monitor_task.fn(*args)
        requests = read_window(log_path, None)
        current = served_ok(requests[requests["ts"] >= since])
        baseline = None
        if baseline_since is not None:
            baseline = served_ok(requests[(requests["ts"] >= baseline_since) & (requests["ts"] < since)])
        feedback = evaluate_feedback(
            read_feedback(feedback_path(monitor.feedback, name, settings.home, spec_file.parent)),
            requests,
            monitor.feedback,
        )
        quality = text_quality_drift(current, baseline, monitor.min_rows)
        undetermined = feedback.verdict == "insufficient_data"
        detectors: dict[str, bool | None] = {
            "data_drift": None if drift.verdict == "insufficient_data" else drift.verdict == "drift",
            "concept_drift": None if undetermined else feedback.concept_drift,
            "calibration": None if feedback.calibration is None else feedback.calibration_drift,
            "text_quality": None if quality is None else quality.drifted,
        }
        mlflow.log_metrics(feedback.as_metrics())
        mlflow.log_metrics({f"alarm_{d}": float(f) for d, f in detectors.items() if f is not None})
        write_gauges(
            gauges_path(settings, name),
            name,
            None if drift.verdict == "insufficient_data" else drift.drift_share,
            {d: bool(f) for d, f in detectors.items() if f is not None},
        )
        responder = Responder(
            monitor.responses,
            ResponseLedger(monitor_state_path(settings)),
            Alerter(monitor.alerting, monitor_state_path(settings), alert_spool_path(settings)),
        )
        context = ResponseContext(
            pipeline=name,
            model=spec.tracking.registered_model,
            spec_path=spec_file,
            out_dir=out_dir,
            log_dir=settings.home / "monitor" / "retrain-logs",
            feedback=feedback,
            use_deployment=use_deployment,
        )
        summaries = {
            "data_drift": f"drift share {drift.drift_share:.2f} over {drift.current_rows} requests",
            "concept_drift": f"feedback accuracy {feedback.accuracy:.3f}, "
            f"{feedback.adwin_detections} ADWIN detections over {feedback.labels} labels",
            "calibration": f"ECE {feedback.calibration.ece:.3f}" if feedback.calibration else "",
            "text_quality": f"output metrics {', '.join(quality.drifted_metrics)}" if quality else "",
        }
        responses = tuple(
            responder.respond(detector, fired, context, summaries[detector], now=now)  # type: ignore[arg-type]
            for detector, fired in detectors.items()
        )
        report = MonitorReport(name, drift, feedback, quality, detectors, responses, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary_path = out_dir / "monitor.json"
        summary_path.write_text(json.dumps(asdict(report), default=str, indent=2))
        mlflow.log_artifact(str(summary_path), "monitor")
        for response in responses:
            mlflow.set_tag(f"lockgate.response.{response.detector}", f"{response.action}:{response.outcome}")
    logger.info(
        "monitor %s: %s over %s; detectors %s; responses %s",
        name,
        drift.verdict,
        drift.window or f"{drift.current_rows} requests",
        {d: f for d, f in detectors.items()},
        [f"{r.detector}:{r.outcome}" for r in responses if r.outcome != "quiet"],
    )
    return report


@flow(name="monitor", flow_run_name="monitor-{pipeline}", log_prints=False)
def monitor_flow(spec_path: str, pipeline: str) -> DriftResult:
    """Validate the last ``monitor.window_minutes`` of traffic, detect drift, report, and respond."""
    spec_file = Path(spec_path).resolve()
    name, spec = load_spec(spec_file).pipeline(pipeline)
    return run_monitor(spec_file, name, spec).drift
