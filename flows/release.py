"""The release flow: validate data → compress → evaluate → register → package → canary → monitor.

One Prefect flow run, one task per stage; one MLflow parent run with a nested run per stage. The
Prefect flow-run id is tagged on the MLflow run and the MLflow run id is written to the Prefect log,
so either side leads to the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.monitor import request_log_path
from flows.spec import PipelineSpec
from flows.spec_loader import load_spec, resolved_spec
from tasks import release_lock
from tasks.canary import CanaryResult, canary_task, release_outcome, resume_canary
from tasks.compress import CompressedModel, compress_task
from tasks.compression.base import StepContext
from tasks.evaluate import Evaluation, evaluate_task
from tasks.log import run_logger
from tasks.model_source import prepare_parent
from tasks.monitor import DriftResult, monitor_task
from tasks.package import package_task
from tasks.recovery import recover_or_resume
from tasks.register import Registration, register_task
from tasks.settings import export_environment, get_settings
from tasks.task_runners import release_task_runner
from tasks.tracking import configure_tracking, run_url
from tasks.validate_data import ValidatedData, validate_datasets


@dataclass
class ReleaseSummary:
    """What the run did, for the CLI's summary table and for tests."""

    pipeline: str
    registered_model: str
    outcome: str  # promoted | rolled_back | rejected | staged
    mlflow_run_id: str
    mlflow_run_url: str
    prefect_flow_run_id: str
    elapsed_s: float
    candidates: dict[str, Evaluation] = field(default_factory=dict)
    compressed: dict[str, CompressedModel] = field(default_factory=dict)
    registration: Registration | None = None
    canary: CanaryResult | None = None
    drift: DriftResult | None = None
    bento_tag: str | None = None
    recovered: list[str] = field(default_factory=list)  # repairs of an interrupted earlier release


def _flatten(prefix: str, value: object, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow caps param values
    return out


def _release_name(pipeline: str) -> str:
    return f"release-{pipeline}"


@flow(name="release", flow_run_name="release-{pipeline}", log_prints=False, task_runner=release_task_runner())
def release_flow(spec_path: str, pipeline: str | None = None) -> ReleaseSummary:
    """Take one pipeline of ``spec_path`` through every stage."""
    import mlflow

    started = time.time()
    settings = get_settings()
    export_environment(settings)
    spec_file = Path(spec_path).resolve()
    name, spec = load_spec(spec_file).pipeline(pipeline)
    logger = run_logger(__name__)
    experiment_id = configure_tracking(spec.tracking.experiment, settings)
    flow_run_id = str(flow_run.get_id() or "")
    trigger = f"prefect-flow-run:{flow_run_id}" if flow_run_id else "lockgate"
    with mlflow.start_run(
        run_name=_release_name(name),
        tags={
            "lockgate.pipeline": name,
            "prefect.flow_run_id": flow_run_id,
            "lockgate.spec_file": str(spec_file),
        },
    ) as run:
        run_id = run.info.run_id
        logger.info("MLflow run %s (%s)", run_id, run_url(run_id, experiment_id))
        resolved = resolved_spec(spec)
        mlflow.log_dict(resolved, "spec/resolved.json")
        mlflow.log_artifact(str(spec_file), "spec")
        mlflow.log_params(_flatten("", resolved, {}))
        summary = ReleaseSummary(
            name,
            spec.tracking.registered_model,
            "rejected",
            run_id,
            run_url(run_id, experiment_id),
            flow_run_id,
            0.0,
        )
        # One release per registered model: taken before anything is registered or staged, given
        # back at the end, also on failure. A lock left by a killed release is taken over, and what
        # that release left behind is repaired first.
        model = spec.tracking.registered_model
        with release_lock.hold(model, release_lock.owner_label(trigger)) as (lock, replaced):
            summary.recovered, interrupted = recover_or_resume(model, replaced, trigger, spec.canary)
            if interrupted is not None:  # a killed release's canary, resumed after its last completed step
                summary.bento_tag = interrupted.bento_tag
                summary.canary = resume_canary(interrupted, spec.canary, run_id, trigger, lock)
                summary.outcome = release_outcome(summary.canary, spec.canary)
            else:
                _run_stages(name, spec, spec_file.parent, run_id, trigger, started, summary, lock)
        summary.elapsed_s = time.time() - started
        mlflow.set_tag("lockgate.outcome", summary.outcome)
        mlflow.log_metric("elapsed_s", summary.elapsed_s)
    logger.info("release %s finished: %s in %.0fs", name, summary.outcome, summary.elapsed_s)
    return summary


def step_context(parent: Path, data: ValidatedData) -> StepContext:
    """What compression steps may use: the parent as teacher, calibration and training rows."""
    import torch

    return StepContext(
        parent=parent,
        calibration_prompts=tuple(data.calibration["prompt"].astype(str)),
        train_pairs=tuple(
            zip(data.train["prompt"].astype(str), data.train["answer"].astype(str), strict=True)
        ),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def _run_stages(
    name: str,
    spec: PipelineSpec,
    base_dir: Path,
    run_id: str,
    trigger: str,
    started: float,
    summary: ReleaseSummary,
    lock: release_lock.LockRef | None = None,
) -> None:
    settings = get_settings()
    logger = run_logger(__name__)
    work = settings.home / "runs" / run_id
    data = validate_datasets(spec.data, base_dir, run_id)
    parent = prepare_parent(spec.model, settings.cache_dir, run_id, settings.demo_train_steps)
    context = step_context(parent.folder, data)
    futures = [
        compress_task.submit(parent.folder, c, settings.cache_dir / "candidates", context, run_id)
        for c in spec.compress.candidates
    ]
    compressed = [f.result() for f in futures]
    evaluations = [
        evaluate_task(
            parent.folder,
            c.folder,
            c.candidate,
            data.eval,
            spec.evaluate,
            run_id,
            quantized_must_not_be_slower=c.quantized and not spec.compress.allow_slower_quantized,
        )
        for c in compressed
    ]
    summary.compressed = {c.candidate: c for c in compressed}
    summary.candidates = {c.candidate: e for c, e in zip(compressed, evaluations, strict=True)}
    registration = register_task(
        spec.tracking.registered_model,
        parent.folder,
        compressed,
        evaluations,
        spec.compress.objective,
        settings.reports_dir / name / run_id,
        run_id,
        trigger,
    )
    summary.registration = registration
    if registration.staged is None:
        logger.warning("no candidate passed its gates: release ends here, Production unchanged")
        return
    summary.outcome = "staged"
    labels = {"pipeline": name, "registered_model": spec.tracking.registered_model}
    bento = package_task(spec.package, labels, work / "package", run_id)
    summary.bento_tag = bento.tag
    request_log = request_log_path(name)
    request_log.parent.mkdir(parents=True, exist_ok=True)
    canary_started = time.time()
    summary.canary = canary_task(
        bento.tag,
        registration.production,
        registration.staged,
        data.eval["prompt"].astype(str).tolist(),
        spec.canary,
        request_log,
        work / "service-logs",
        run_id,
        trigger,
        lock,
        settings.reports_dir / name / run_id,
    )
    if summary.canary.decision == "rollback":
        summary.outcome = "rolled_back"
    elif spec.canary.promote:
        summary.outcome = "promoted"
    report_dir = settings.reports_dir / name / run_id
    summary.drift = monitor_task(
        request_log,
        canary_started,
        data.reference["prompt"].astype(str).tolist(),
        parent.folder,
        spec.monitor,
        report_dir,
        run_id,
    )
