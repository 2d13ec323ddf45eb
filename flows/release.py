"""The release flow: validate data → compress → evaluate → register → package → canary → monitor.

One Prefect flow run, one task per stage; one MLflow parent run with a nested run per stage. The
Prefect flow-run id is tagged on the MLflow run and the MLflow run id is written to the Prefect log,
so either side leads to the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.runtime import flow_run

from lockgate.bentos.chat import render_prompt
from lockgate.flows.monitor import request_log_path
from lockgate.flows.spec import DatasetSpec, EvaluateSpec, PipelineSpec, PromptFormat
from lockgate.flows.spec_loader import load_spec, resolved_spec
from lockgate.flows.story import prefect_flow_run_url, publish_to_mlflow, publish_to_prefect, registry_lines
from lockgate.tasks.canary import canary_task, release_outcome, resume_canary
from lockgate.tasks.compress import CompressedModel, compress_task
from lockgate.tasks.compression.base import StepContext
from lockgate.tasks.evaluate import Evaluation, evaluate_task
from lockgate.tasks.model_source import prepare_parent
from lockgate.tasks.monitor import DriftResult, monitor_task
from lockgate.tasks.package import package_task
from lockgate.tasks.platform.datasets import load_dataset
from lockgate.tasks.platform.log import run_logger
from lockgate.tasks.platform.progress import stage_header
from lockgate.tasks.platform.settings import export_environment, get_settings
from lockgate.tasks.platform.storage import tree_bytes
from lockgate.tasks.platform.task_runners import release_task_runner
from lockgate.tasks.platform.tracking import configure_tracking, run_url
from lockgate.tasks.register import Registration, register_task
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.live import choose_traffic, live_canary_task, with_reason
from lockgate.tasks.release.outcome import CanaryResult
from lockgate.tasks.release.recovery import recover_or_resume
from lockgate.tasks.release.state import CanaryState
from lockgate.tasks.validate_data import ValidatedData, validate_datasets


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
    home_added_bytes: int | None = None  # growth of LOCKGATE_HOME during the release
    home_bytes: int | None = None
    registry_after: list[str] = field(default_factory=list)  # every version after the decision
    prefect_flow_run_url: str = ""


def key_params(spec: PipelineSpec) -> dict[str, str]:
    """The few parameters a reviewer compares releases on; the whole resolved spec is an artifact."""
    return {
        "model.source": str(spec.model.source),
        "candidates": ", ".join(c.name for c in spec.compress.candidates),
        "objective": f"{spec.compress.objective.goal} {spec.compress.objective.metric}",
        "gates": ", ".join(sorted(spec.evaluate.gates)) or "-",
        "eval.max_samples": str(spec.evaluate.max_samples),
        "canary.strategy": spec.canary.strategy,
        "canary.steps": ", ".join(f"{step.share:g}%" for step in spec.canary.steps),
        "canary.promote": str(spec.canary.promote),
        "registered_model": spec.tracking.registered_model,
    }


#: The stages of a release, in order ("stage k/n: name" in the terminal).
RELEASE_STAGES = (
    "validate-data",
    "prepare-parent",
    "compress",
    "evaluate",
    "register",
    "package",
    "canary",
    "monitor",
)


def _release_name(pipeline: str) -> str:
    return f"release-{pipeline}"


@flow(name="release", flow_run_name="release-{pipeline}", log_prints=False, task_runner=release_task_runner())
def release_flow(spec_path: str, pipeline: str | None = None) -> ReleaseSummary:
    """Take one pipeline of ``spec_path`` through every stage."""
    import mlflow

    started = time.time()
    settings = get_settings()
    export_environment(settings)
    home_before = tree_bytes(settings.home)
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
        mlflow.log_dict(resolved_spec(spec), "spec/resolved.json")
        mlflow.log_artifact(str(spec_file), "spec")
        mlflow.log_params(key_params(spec))
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
        summary.home_bytes = tree_bytes(settings.home)
        summary.home_added_bytes = summary.home_bytes - home_before
        mlflow.log_metric("home_added_bytes", summary.home_added_bytes)
        summary.registry_after = registry_lines(model)
        summary.prefect_flow_run_url = prefect_flow_run_url(flow_run_id)
        tell_story(summary, settings.reports_dir / name / run_id)
    logger.info("release %s finished: %s in %.0fs", name, summary.outcome, summary.elapsed_s)
    return summary


def tell_story(summary: ReleaseSummary, report_dir: Path) -> None:
    """The release on one page: the parent run's note, decision and winner metrics in MLflow; tables,
    the note and a link to the MLflow run as artifacts of the Prefect flow run."""
    links = {"MLflow run": summary.mlflow_run_url}
    if report_dir.is_dir():
        links["Reports folder"] = report_dir.resolve().as_uri()
        for label, file in (("Candidates table", "candidates.md"), ("Pareto plot", "candidates-pareto.png")):
            if (report_dir / file).is_file():
                links[label] = (report_dir / file).resolve().as_uri()
    publish_to_mlflow(summary, links)
    if summary.prefect_flow_run_id:
        publish_to_prefect(summary, summary.mlflow_run_url)


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


def load_task_frames(spec: EvaluateSpec, base_dir: Path) -> dict[str, pd.DataFrame]:
    """The rows of every evaluate.tasks entry (files relative to the spec file)."""
    return {t.name: load_dataset("eval", DatasetSpec(source=t.data), base_dir) for t in spec.tasks}


def rendered_prompts(model_folder: Path, prompts: list[str], prompt_format: PromptFormat) -> list[str]:
    """Canary and replay traffic as the model receives it: a chat model's prompts rendered with its chat
    template by the same function as evaluation (and as the service's ``messages``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    return [render_prompt(tokenizer, p, prompt_format) for p in prompts]


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
    stage = iter(range(1, len(RELEASE_STAGES) + 1))
    candidates = f"{len(spec.compress.candidates)} candidate(s)"

    def header(detail: str = "") -> None:
        index = next(stage)
        stage_header(index, len(RELEASE_STAGES), RELEASE_STAGES[index - 1], detail)

    header("eval, calibration, reference, train")
    data = validate_datasets(spec.data, base_dir, run_id)
    header(str(spec.model.source))
    parent = prepare_parent(spec.model, settings.cache_dir, run_id, settings.demo_train_steps)
    context = step_context(parent.folder, data)
    header(", ".join(c.name for c in spec.compress.candidates))
    futures = [
        compress_task.submit(parent.folder, c, settings.cache_dir / "candidates", context, run_id)
        for c in spec.compress.candidates
    ]
    compressed = [f.result() for f in futures]
    task_frames = load_task_frames(spec.evaluate, base_dir)
    header(f"{candidates} against the parent")
    evaluations = [
        evaluate_task(
            parent.folder,
            c.folder,
            c.candidate,
            data.eval,
            spec.evaluate,
            run_id,
            quantized_must_not_be_slower=c.quantized and not spec.compress.allow_slower_quantized,
            task_frames=task_frames,
            eval_format=spec.data.eval.format,
            model_id=c.model_id,
        )
        for c in compressed
    ]
    summary.compressed = {c.candidate: c for c in compressed}
    summary.candidates = {c.candidate: e for c, e in zip(compressed, evaluations, strict=True)}
    header(spec.tracking.registered_model)
    registration = register_task(
        spec.tracking.registered_model,
        parent.folder,
        compressed,
        evaluations,
        spec.compress.objective,
        settings.reports_dir / name / run_id,
        run_id,
        trigger,
        name,
    )
    summary.registration = registration
    if registration.staged is None:
        logger.warning("no candidate passed its gates: release ends here, Production unchanged")
        return
    summary.outcome = "staged"
    labels = {"pipeline": name, "registered_model": spec.tracking.registered_model}
    header(spec.package.service_name)
    bento = package_task(spec.package, labels, work / "package", run_id)
    summary.bento_tag = bento.tag
    request_log = request_log_path(name)
    request_log.parent.mkdir(parents=True, exist_ok=True)
    canary_started = time.time()
    header(
        f"{spec.canary.strategy}: v{registration.staged.version} against v{registration.production.version}"
    )
    traffic, why = choose_traffic(spec.canary, spec.tracking.registered_model)
    logger.info("canary traffic: %s (%s)", traffic, why)
    if traffic == "live":
        summary.canary = live_canary_task(
            registration.production, registration.staged, spec.canary, trigger, why, run_id, lock
        )
    else:
        state = CanaryState.start(
            spec.canary,
            bento_tag=bento.tag,
            stable=registration.production,
            candidate=registration.staged,
            prompts=rendered_prompts(
                parent.folder, data.eval["prompt"].astype(str).tolist(), spec.data.eval.format
            ),
            request_log=request_log,
            log_dir=work / "service-logs",
            report_dir=settings.reports_dir / name / run_id,
            mlflow_run_id=run_id,
            service_config=spec.package.public_json(),
        )
        summary.canary = canary_task(state, spec.canary, trigger, lock)
        summary.canary = with_reason(summary.canary, why, "replay")
    if summary.canary.decision == "rollback":
        summary.outcome = "rolled_back"
    elif spec.canary.promote:
        summary.outcome = "promoted"
    report_dir = settings.reports_dir / name / run_id
    header("drift of the served traffic against the reference set")
    summary.drift = monitor_task(
        request_log,
        canary_started,
        rendered_prompts(
            parent.folder, data.reference["prompt"].astype(str).tolist(), spec.data.reference.format
        ),
        parent.folder,
        spec.monitor,
        report_dir,
        run_id,
    )
