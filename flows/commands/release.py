"""Release commands: validate, schema, run, monitor, deploy, plan."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lockgate.tasks.platform.errors import LockgateError, SpecError

if TYPE_CHECKING:
    pass

from lockgate.flows.commands.common import (
    JsonOut,
    SpecFile,
    Verbose,
    fail,
    pipeline_name,
)


def validate(file: SpecFile = Path("pipelines.yaml"), as_json: JsonOut = False) -> None:
    """Check the spec; print every problem as FILE:LINE:COL: field.path: message, and warnings (gates
    tighter than the evaluation set can resolve) the same way; warnings do not fail validation."""
    from lockgate.flows.spec_loader import load_spec, spec_warnings

    try:
        spec = load_spec(file)
        warnings = spec_warnings(file)
    except SpecError as exc:
        if as_json:
            typer.echo(json.dumps({"valid": False, "problems": exc.problems}))
            raise typer.Exit(exc.exit_code) from None
        raise fail(exc) from None
    names = list(spec.pipelines)
    if not as_json:
        for warning in warnings:
            typer.echo(warning, err=True)
    typer.echo(
        json.dumps({"valid": True, "pipelines": names, "warnings": warnings})
        if as_json
        else f"{file}: ok ({', '.join(names)})"
    )


def schema() -> None:
    """Print the JSON Schema of pipelines.yaml (committed as schemas/pipelines.schema.json)."""
    from lockgate.flows.spec_loader import json_schema_text

    typer.echo(json_schema_text(), nl=False)


def run(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Run the release flow of one pipeline (a Prefect flow run, tracked in MLflow)."""
    pipeline = pipeline_name(file, pipeline)  # fail fast, before Prefect starts
    from lockgate.flows.spec_loader import load_spec
    from lockgate.tasks.platform.settings import export_environment
    from lockgate.tasks.release import lock as release_lock

    export_environment()  # before prefect is imported: it reads PREFECT_HOME at import time
    from lockgate.tasks.platform.local_api import start_local_api

    try:  # another live release of the model: fail in a second, naming its owner
        release_lock.check_free(load_spec(file).pipelines[pipeline].tracking.registered_model)
        start_local_api()  # a slow start-up on a loaded machine: retried, or a clear error
    except LockgateError as exc:
        raise fail(exc, verbose=verbose) from None
    from lockgate.flows.release import release_flow
    from lockgate.flows.summary import render_summary
    from lockgate.tasks.platform.log import configure

    configure()  # after prefect: its logging config already routes `lockgate` logs to the run logs

    try:
        summary = release_flow(str(file), pipeline)
    except LockgateError as exc:
        raise fail(exc, verbose=verbose) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "pipeline": summary.pipeline,
                    "outcome": summary.outcome,
                    "mlflow_run_id": summary.mlflow_run_id,
                    "prefect_flow_run_id": summary.prefect_flow_run_id,
                    "elapsed_s": summary.elapsed_s,
                }
            )
        )
    else:
        typer.echo(render_summary(summary))
    if summary.outcome in {"rejected", "rolled_back"}:
        raise typer.Exit(3)


def monitor(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Run the monitor flow once: drift of the last window of served traffic."""
    pipeline = pipeline_name(file, pipeline)
    from lockgate.tasks.platform.settings import export_environment

    export_environment()
    from lockgate.flows.monitor import monitor_flow
    from lockgate.tasks.platform.local_api import start_local_api
    from lockgate.tasks.platform.log import configure

    configure()
    try:
        start_local_api()
        result = monitor_flow(str(file), pipeline)
    except LockgateError as exc:
        raise fail(exc, verbose=verbose) from None
    payload = {
        "verdict": result.verdict,
        "drift_share": result.drift_share,
        "rows": result.current_rows,
        "html": str(result.html_path) if result.html_path else None,
    }
    typer.echo(
        json.dumps({**payload, "window": result.window})
        if as_json
        else " ".join(f"{k}={v}" for k, v in payload.items())
    )
    if not as_json and result.window:
        typer.echo(f"window: {result.window}")
    if result.verdict == "drift":
        raise typer.Exit(3)


def deploy(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    pool: Annotated[
        str | None,
        typer.Option(help="Create the deployments in this work pool (run by `lockgate worker`) and return."),
    ] = None,
) -> None:
    """Prefect deployments: the release flow on demand, the monitor flow on the spec's cron.

    With --pool they are created in that work pool on the Prefect server (LOCKGATE_PREFECT_API_URL) and
    workers run them; without it this command serves them itself (blocks and executes the runs the
    server hands it)."""
    from lockgate.flows.spec_loader import load_spec

    pipeline = pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from lockgate.tasks.platform.settings import export_environment

    export_environment()
    if pool is not None:
        if not os.environ.get("PREFECT_API_URL"):
            raise fail(
                "--pool needs a Prefect server: set LOCKGATE_PREFECT_API_URL (eval $(lockgate env))", code=2
            )
        from lockgate.flows.commands.stack import deploy_to_pool

        for deployment_id, kind in zip(
            deploy_to_pool(file, pipeline, spec, pool), ("release", "monitor"), strict=True
        ):
            schedule = f" on cron {spec.monitor.schedule!r}" if kind == "monitor" else " (on demand)"
            typer.echo(f"{kind}/{pipeline}-{kind} -> pool {pool}{schedule}: {deployment_id}")
        return
    from prefect import serve

    from lockgate.flows.monitor import monitor_flow
    from lockgate.flows.release import release_flow

    params = {"spec_path": str(file.resolve()), "pipeline": pipeline}
    serve(
        release_flow.to_deployment(name=f"{pipeline}-release", parameters=params),
        monitor_flow.to_deployment(name=f"{pipeline}-monitor", parameters=params, cron=spec.monitor.schedule),
    )


def plan(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
) -> None:
    """Print the release strategy's steps, minimum promotion time and worst-case rollback time."""
    from dataclasses import asdict

    from lockgate.flows.spec_loader import load_spec
    from lockgate.tasks.release.plan import plan_release, render_plan

    pipeline = pipeline_name(file, pipeline)
    result = plan_release(load_spec(file).pipelines[pipeline].canary)
    typer.echo(
        json.dumps({"pipeline": pipeline, **asdict(result)}, indent=2)
        if as_json
        else render_plan(pipeline, result)
    )


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)
    app.command()(run)
    app.command()(monitor)
    app.command()(deploy)
    app.command()(plan)
