"""MLflow tracking: the experiment, one parent run per release, one nested run per stage.

Prefect may run tasks in worker threads, and MLflow's active-run stack is per thread, so stage
runs name their parent explicitly instead of relying on the caller's active run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.progress import heartbeat
from lockgate.tasks.platform.settings import Settings, get_settings

if TYPE_CHECKING:
    from mlflow.entities import Run

log = get_logger(__name__)


def configure_tracking(experiment: str, settings: Settings | None = None) -> str:
    """Point MLflow at the configured store and make sure ``experiment`` exists; returns its id."""
    import mlflow

    s = settings or get_settings()
    mlflow.set_tracking_uri(s.tracking_uri)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        # A local artifact root only for the embedded sqlite store; a tracking server picks its own.
        location = s.artifact_root if s.tracking_uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def stage_run(parent_run_id: str | None, stage: str, **tags: str) -> Iterator[Run]:
    """A nested MLflow run for one stage under ``parent_run_id`` (works from any thread); a heartbeat
    line every ~10 s while it runs."""
    import mlflow

    active = mlflow.active_run()
    kwargs = (
        {} if active is not None and active.info.run_id == parent_run_id else {"parent_run_id": parent_run_id}
    )
    with (
        mlflow.start_run(
            run_name=stage, nested=True, tags={"lockgate.stage": stage, **tags}, **kwargs
        ) as run,
        heartbeat(f"running {stage}"),
    ):
        yield run


def run_url(run_id: str, experiment_id: str, ui_base: str | None = None) -> str:
    """Where the MLflow UI shows this run: the tracking server's own UI, else ``lockgate ui``'s."""
    if ui_base is None:
        uri = get_settings().tracking_uri
        ui_base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}"
