"""The monitor flow: drift of the last window of served traffic, on a cron schedule or ad hoc.

The release flow ends with the same monitor task over its canary traffic; this flow is what a
Prefect deployment runs every ``monitor.schedule`` over whatever the services logged since.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from flows.spec_loader import load_spec
from tasks.datasets import load_dataset
from tasks.log import run_logger
from tasks.model_source import resolve_parent
from tasks.monitor import DriftResult, monitor_task
from tasks.settings import export_environment, get_settings
from tasks.tracking import configure_tracking
from tasks.validate_data import validate_frame


def request_log_path(pipeline: str) -> Path:
    """Where the services of ``pipeline`` append their request log (shared with the release flow)."""
    return get_settings().request_log_dir / f"{pipeline}.sqlite"


@flow(name="monitor", flow_run_name="monitor-{pipeline}", log_prints=False)
def monitor_flow(spec_path: str, pipeline: str) -> DriftResult:
    """Evidently drift report of the last ``monitor.window_minutes`` of traffic vs the reference set."""
    import mlflow

    settings = get_settings()
    export_environment(settings)
    spec_file = Path(spec_path).resolve()
    name, spec = load_spec(spec_file).pipeline(pipeline)
    logger = run_logger(__name__)
    configure_tracking(spec.tracking.experiment, settings)
    reference = load_dataset("reference", spec.data.reference, spec_file.parent)
    validate_frame("reference", reference, spec.data.max_prompt_chars)
    since = time.time() - spec.monitor.window_minutes * 60
    with mlflow.start_run(
        run_name=f"monitor-{name}", tags={"lockgate.pipeline": name, "lockgate.flow": "monitor"}
    ) as run:
        # Reference features use the parent's tokenizer: the one every candidate of this pipeline shares.
        parent = resolve_parent(spec.model, settings.cache_dir, settings.demo_train_steps)
        result = monitor_task(
            request_log_path(name),
            since,
            reference["prompt"].astype(str).tolist(),
            parent.folder,
            spec.monitor,
            settings.reports_dir / name / "monitor" / time.strftime("%Y%m%dT%H%M%S"),
            run.info.run_id,
        )
    logger.info("monitor %s: %s over %d requests", name, result.verdict, result.current_rows)
    return result
