"""CLI commands of the team setup: `lockgate up` / `down` / `env` / `worker`, and deployments to a
work pool (`lockgate deploy --pool`). Registered on the main app by ``flows/cli.py``; heavy imports
stay inside the commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lockgate.flows.commands.common import fail
from lockgate.tasks.platform.errors import LockgateError

if TYPE_CHECKING:
    from lockgate.flows.spec import PipelineSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
RELEASE_ENTRYPOINT = "flows/release.py:release_flow"
MONITOR_ENTRYPOINT = "flows/monitor.py:monitor_flow"


def up(
    workers: Annotated[int, typer.Option(min=0, help="Process workers to start for the pool.")] = 1,
    artifacts_destination: Annotated[
        str | None,
        typer.Option(
            help="Where the MLflow server stores artifacts (a folder, s3://…); default: the stack dir."
        ),
    ] = None,
    print_env: Annotated[
        bool,
        typer.Option("--print-env", help="Print only `export` lines, for `eval $(lockgate up --print-env)`."),
    ] = False,
) -> None:
    """Start a local team stack on 127.0.0.1: PostgreSQL, an MLflow server on it, a Prefect server, a
    process work pool and its workers. Idempotent; `lockgate down` stops it."""
    from lockgate.tasks.platform import team_stack

    try:
        state = team_stack.up(workers=workers, artifacts_destination=artifacts_destination)
    except LockgateError as exc:
        raise fail(exc) from None
    if print_env:
        typer.echo(team_stack.export_lines(state), nl=False)
        return
    workers_text = ", ".join(n for n in state.processes if n.startswith("lockgate-worker")) or "none"
    typer.echo(
        f"MLflow    {state.mlflow_url}  (PostgreSQL on 127.0.0.1:{state.postgres_port}, artifacts in "
        f"{state.artifacts_destination})\n"
        f"Prefect   {state.prefect_api_url}  (UI: {state.prefect_api_url.removesuffix('/api')})\n"
        f"pool      {state.work_pool}: {workers_text}\n"
        f"use it:   eval $(lockgate env)   then   lockgate deploy --pool {state.work_pool}"
    )


def down() -> None:
    """Stop the local team stack (workers, servers, PostgreSQL); its data stays for the next `up`."""
    from lockgate.tasks.platform import team_stack

    stopped = team_stack.down()
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "no team stack running")


def env() -> None:
    """Print `export` lines pointing lockgate, MLflow and Prefect at the running local stack."""
    from lockgate.tasks.platform import team_stack

    state = team_stack.read_state()
    if state is None:
        raise fail("no team stack running: `lockgate up` first", code=1)
    typer.echo(team_stack.export_lines(state), nl=False)


def worker(
    pool: Annotated[str | None, typer.Option(help="Work pool; default: LOCKGATE_WORK_POOL.")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name; default: Prefect's.")] = None,
) -> None:
    """Start a Prefect process worker in the foreground: it executes the pool's flow runs (release,
    monitor) in subprocesses that inherit this environment (LOCKGATE_*, MLFLOW_*, PREFECT_API_URL)."""
    from lockgate.tasks.platform.settings import export_environment, get_settings
    from lockgate.tasks.platform.team_stack import HEARTBEAT_S

    export_environment()
    if not os.environ.get("PREFECT_API_URL"):
        raise fail(
            "a worker needs a Prefect server: set LOCKGATE_PREFECT_API_URL (or eval $(lockgate env))", code=2
        )
    from lockgate.tasks.platform.team_stack import worker_command

    # Heartbeats let the server mark a run Crashed when this worker dies with it (`lockgate up`'s
    # automation); Prefect's minimum interval is 30 s.
    env = {**os.environ, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    command = worker_command(pool or get_settings().work_pool, name)
    raise typer.Exit(subprocess.call(command, env=env, cwd=REPO_ROOT))


def deploy_to_pool(spec_file: Path, pipeline: str, spec: PipelineSpec, pool: str) -> list[str]:
    """Create (or update) the two deployments in ``pool``: release on demand, monitor on the spec's cron.

    The code is pulled from this checkout (``flow.from_source`` on the repo folder: the deployment's pull
    step sets the working directory), so workers on the same machine — or on machines with the same
    checkout at the same path — run it; the spec path is absolute for the same reason."""
    from prefect import flow

    params = {"spec_path": str(spec_file.resolve()), "pipeline": pipeline}
    ids = []
    for entrypoint, suffix, cron in (
        (RELEASE_ENTRYPOINT, "release", None),
        (MONITOR_ENTRYPOINT, "monitor", spec.monitor.schedule),
    ):
        remote = flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)
        deployment_id = remote.deploy(
            name=f"{pipeline}-{suffix}",
            work_pool_name=pool,
            parameters=params,
            cron=cron,
            print_next_steps=False,
            tags=["lockgate", pipeline],
        )
        ids.append(str(deployment_id))
    return ids


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
    app.command()(env)
    app.command()(worker)
