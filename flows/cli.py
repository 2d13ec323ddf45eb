"""The ``lockgate`` command line. Heavy libraries are imported inside commands, so ``validate`` and
``schema`` answer in well under a second without importing torch, MLflow or BentoML."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows import stack
from tasks.errors import LockgateError, SpecError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tasks.canary import CanaryState

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Declarative LLM releases: compress -> evaluate -> package -> canary -> monitor.",
)

stack.register(app)  # up, down, env, worker

SpecFile = Annotated[Path, typer.Option("--file", "-f", help="The spec file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")]


def _cli_trigger() -> str:
    """Who triggered a manual registry change (recorded on the versions and in the history)."""
    return f"cli:{os.environ.get('USER', 'unknown')}"


@contextlib.contextmanager
def _manual_change(model: str, action: str) -> Iterator[tuple[str, bool]]:
    """Hold MODEL's release lock for a manual registry change; yields (trigger, replaced) where
    ``replaced`` says a dead release's lock was taken over. A lockgate error exits with its message."""
    from tasks import release_lock

    trigger = _cli_trigger()
    try:
        with release_lock.hold(model, release_lock.owner_label(f"{trigger} {action}")) as (_, replaced):
            yield trigger, replaced
    except LockgateError as exc:
        raise _fail(exc, False) from None


def _fail(exc: LockgateError, verbose: bool) -> typer.Exit:
    if verbose:
        import traceback

        traceback.print_exception(exc)
    typer.echo(str(exc), err=True)
    return typer.Exit(exc.exit_code)


@app.command()
def validate(file: SpecFile = Path("pipelines.yaml"), as_json: JsonOut = False) -> None:
    """Check the spec; print every problem as FILE:LINE:COL: field.path: message."""
    from flows.spec_loader import load_spec

    try:
        spec = load_spec(file)
    except SpecError as exc:
        if as_json:
            typer.echo(json.dumps({"valid": False, "problems": exc.problems}))
        else:
            for problem in exc.problems:
                typer.echo(problem, err=True)
        raise typer.Exit(exc.exit_code) from None
    names = list(spec.pipelines)
    typer.echo(
        json.dumps({"valid": True, "pipelines": names}) if as_json else f"{file}: ok ({', '.join(names)})"
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipelines.yaml (committed as schemas/pipelines.schema.json)."""
    from flows.spec_loader import json_schema_text

    typer.echo(json_schema_text(), nl=False)


@app.command()
def run(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Run the release flow of one pipeline (a Prefect flow run, tracked in MLflow)."""
    pipeline = _pipeline_name(file, pipeline)  # fail fast, before Prefect starts
    from flows.spec_loader import load_spec
    from tasks import release_lock
    from tasks.settings import export_environment

    export_environment()  # before prefect is imported: it reads PREFECT_HOME at import time
    try:  # another live release of the model: fail in a second, naming its owner
        release_lock.check_free(load_spec(file).pipelines[pipeline].tracking.registered_model)
    except LockgateError as exc:
        raise _fail(exc, verbose) from None
    from flows.release import release_flow
    from flows.summary import render_summary
    from tasks.log import configure

    configure()  # after prefect: its logging config already routes `lockgate` logs to the run logs

    try:
        summary = release_flow(str(file), pipeline)
    except LockgateError as exc:
        raise _fail(exc, verbose) from None
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


@app.command()
def monitor(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Run the monitor flow once: drift of the last window of served traffic."""
    pipeline = _pipeline_name(file, pipeline)
    from tasks.settings import export_environment

    export_environment()
    from flows.monitor import monitor_flow
    from tasks.log import configure

    configure()
    try:
        result = monitor_flow(str(file), pipeline)
    except LockgateError as exc:
        raise _fail(exc, verbose) from None
    payload = {
        "verdict": result.verdict,
        "drift_share": result.drift_share,
        "rows": result.current_rows,
        "html": str(result.html_path) if result.html_path else None,
    }
    typer.echo(json.dumps(payload) if as_json else " ".join(f"{k}={v}" for k, v in payload.items()))
    if result.verdict == "drift":
        raise typer.Exit(3)


@app.command()
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
    from flows.spec_loader import load_spec

    pipeline = _pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from tasks.settings import export_environment

    export_environment()
    if pool is not None:
        if not os.environ.get("PREFECT_API_URL"):
            typer.echo(
                "--pool needs a Prefect server: set LOCKGATE_PREFECT_API_URL (eval $(lockgate env))", err=True
            )
            raise typer.Exit(2)
        from flows.stack import deploy_to_pool

        for deployment_id, kind in zip(
            deploy_to_pool(file, pipeline, spec, pool), ("release", "monitor"), strict=True
        ):
            schedule = f" on cron {spec.monitor.schedule!r}" if kind == "monitor" else " (on demand)"
            typer.echo(f"{kind}/{pipeline}-{kind} -> pool {pool}{schedule}: {deployment_id}")
        return
    from prefect import serve

    from flows.monitor import monitor_flow
    from flows.release import release_flow

    params = {"spec_path": str(file.resolve()), "pipeline": pipeline}
    serve(
        release_flow.to_deployment(name=f"{pipeline}-release", parameters=params),
        monitor_flow.to_deployment(name=f"{pipeline}-monitor", parameters=params, cron=spec.monitor.schedule),
    )


def _pipeline_name(file: Path, pipeline: str | None) -> str:
    """The pipeline's name (the first when None); a bad spec or name exits 2 with every problem."""
    from flows.spec_loader import load_spec

    try:
        return load_spec(file).pipeline(pipeline)[0]
    except SpecError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(2) from None


def _tracking() -> None:
    import mlflow

    from tasks.settings import export_environment, get_settings

    export_environment()
    mlflow.set_tracking_uri(get_settings().tracking_uri)


@app.command()
def status(
    model: Annotated[str | None, typer.Argument(help="Registered model; default: all.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Registered models, their versions, stages and last release outcome."""
    _tracking()
    from tasks import registry

    names = [model] if model else registry.registered_model_names()
    report = {}
    try:
        for name in names:
            report[name] = [
                {
                    "version": v.version,
                    "stage": v.stage,
                    "aliases": list(v.aliases),
                    "decision": v.tags.get(registry.TAG_DECISION, ""),
                    "reason": v.tags.get(registry.TAG_REASON, ""),
                    "candidate": v.tags.get(registry.TAG_CANDIDATE, v.tags.get("lockgate.role", "")),
                    "created": datetime.fromtimestamp(v.created_ms / 1000, UTC).isoformat(timespec="seconds"),
                }
                for v in registry.list_versions(name)
            ]
    except LockgateError as exc:
        raise _fail(exc, False) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report:
        typer.echo("no registered models yet: run `lockgate run`")
    for name, versions in report.items():
        typer.echo(f"{name}")
        for v in versions:
            aliases = f" @{','.join(v['aliases'])}" if v["aliases"] else ""
            typer.echo(
                f"  v{v['version']:<4} {v['stage']:<10} {v['candidate']:<10} {v['decision']:<12}"
                f"{aliases}  {v['reason'][:80]}"
            )


@app.command()
def history(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: JsonOut = False,
) -> None:
    """Deployment history: every stage transition of MODEL, when, why and by whom."""
    _tracking()
    from dataclasses import asdict

    from tasks import registry

    events = registry.history(model)
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in events], indent=2))
        return
    if not events:
        typer.echo(f"no recorded transitions for {model}")
    for e in events:
        when = datetime.fromtimestamp(e.time_ms / 1000, UTC).isoformat(timespec="seconds")
        typer.echo(
            f"{when}  v{e.version:<4} {e.from_stage:>10} -> {e.to_stage:<10} {e.trigger:<28} {e.reason[:90]}"
        )


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on both versions.")] = "manual rollback",
    to: Annotated[
        str | None, typer.Option("--to", help="Version to restore; default: the one replaced.")
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Put the previous (or the given) version back into Production (stage transitions, logged).

    Takes the model's release lock: refused while a release of MODEL is running."""
    _tracking()
    from tasks import registry

    with _manual_change(model, "rollback") as (trigger, _):
        restored, demoted = registry.roll_back_production(model, reason, trigger=trigger, to_version=to)
    if as_json:
        typer.echo(json.dumps({"model": model, "production": restored.version, "archived": demoted.version}))
    else:
        typer.echo(f"{model}: Production v{demoted.version} -> v{restored.version} ({reason})")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str | None, typer.Option(help="Version to promote; default: the Staging one.")] = None,
    reason: Annotated[str, typer.Option(help="Why; recorded on the version.")] = "manual promotion",
    as_json: JsonOut = False,
) -> None:
    """Promote the Staging (or given) version to Production; the old Production is archived after.

    Takes the model's release lock: refused while a release of MODEL is running."""
    _tracking()
    from tasks import registry
    from tasks.errors import RegistryError

    with _manual_change(model, "promote") as (trigger, _):
        ref = (
            registry.ModelVersionRef(model, version)
            if version
            else registry.version_in_stage(model, "Staging")
        )
        if ref is None:
            raise RegistryError(f"{model} has no Staging version to promote; pass --version")
        registry.describe_version(ref)  # an unknown version fails here, before any transition
        old = registry.promote(ref, reason, trigger)
    previous = old.version if old else None
    if as_json:
        typer.echo(json.dumps({"model": model, "production": ref.version, "archived": previous}))
    else:
        typer.echo(f"{model}: Production v{previous or '-'} -> v{ref.version} ({reason})")


@app.command()
def plan(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    as_json: JsonOut = False,
) -> None:
    """Print the release strategy's steps, minimum promotion time and worst-case rollback time."""
    from dataclasses import asdict

    from flows.spec_loader import load_spec
    from tasks.canary_plan import plan_release, render_plan

    pipeline = _pipeline_name(file, pipeline)
    result = plan_release(load_spec(file).pipelines[pipeline].canary)
    typer.echo(
        json.dumps({"pipeline": pipeline, **asdict(result)}, indent=2)
        if as_json
        else render_plan(pipeline, result)
    )


canary_app = typer.Typer(help="Releases in progress: status and recovery.", no_args_is_help=True)
app.add_typer(canary_app, name="canary")


@canary_app.command("status")
def canary_status(
    model: Annotated[str | None, typer.Argument(help="Registered model; default: all.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Release locks (who runs a release, in which phase), each model's Staging candidate and the
    persisted canary a restarted `lockgate run` would resume."""
    _tracking()
    from tasks import registry, release_lock
    from tasks.canary import load_state

    locks = {lock.model: lock for lock in release_lock.all_locks()}
    registered = set(registry.registered_model_names())
    names = [model] if model else sorted(registered | set(locks))
    report: dict[str, dict] = {}
    try:
        for name in names:
            lock = locks.get(name)
            staged = registry.version_in_stage(name, "Staging") if name in registered else None
            production = registry.version_in_stage(name, "Production") if name in registered else None
            decision = registry.describe_version(staged).tags.get(registry.TAG_DECISION, "") if staged else ""
            report[name] = {
                "release": None
                if lock is None
                else {
                    "state": lock.state(),
                    "owner": lock.owner,
                    "phase": lock.phase,
                    "expires_in_s": round(lock.expires_at - time.time()),
                },
                "production": production.version if production else None,
                "staging": {"version": staged.version, "decision": decision} if staged else None,
                "checkpoint": _checkpoint_status(load_state(name)),
            }
    except LockgateError as exc:
        raise _fail(exc, False) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not report:
        typer.echo("no registered models and no releases")
    for name, item in report.items():
        release, staging = item["release"], item["staging"]
        running = (
            f"release {release['state']} ({release['phase']}) by {release['owner']}"
            if release
            else "no release running"
        )
        staged_text = (
            f"staging v{staging['version']} ({staging['decision']})" if staging else "nothing in Staging"
        )
        saved = item["checkpoint"]
        saved_text = (
            f"; canary of v{saved['candidate']} saved after {saved['completed_steps']} step(s)"
            if saved
            else ""
        )
        typer.echo(f"{name}: production v{item['production'] or '-'}; {staged_text}; {running}{saved_text}")


def _checkpoint_status(state: CanaryState | None) -> dict | None:
    """The persisted canary as `canary status` shows it."""
    if state is None:
        return None
    return {
        "candidate": state.candidate.version,
        "stable": state.stable.version,
        "completed_steps": len(state.checkpoint.steps),
    }


@canary_app.command("recover")
def canary_recover(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: JsonOut = False,
) -> None:
    """Clean up after a release that died: stop its services, complete a half-done promotion, roll back
    a candidate whose canary never decided. `lockgate run` does the same before it starts, except that
    it resumes such a canary instead where canary.on_interrupt is resume and the state allows it."""
    _tracking()
    from tasks.recovery import recover_interrupted

    with _manual_change(model, "recover") as (trigger, replaced):
        actions = recover_interrupted(model, replaced, trigger)
    if as_json:
        typer.echo(json.dumps({"model": model, "actions": actions}))
    else:
        typer.echo("\n".join(actions) if actions else f"{model}: nothing to recover")


@app.command()
def serve(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    port: Annotated[int, typer.Option(help="Port on LOCKGATE_HOST.")] = 3000,
    stage: Annotated[str, typer.Option(help="Registry stage or @alias to follow.")] = "Production",
) -> None:
    """Serve the pipeline's registered model, following the registry (a stage transition hot-swaps)."""
    from flows.spec_loader import load_spec

    pipeline = _pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from tasks.package import service_config
    from tasks.settings import export_environment, get_settings

    export_environment()
    settings = get_settings()
    from flows.monitor import request_log_path

    ref = stage if stage.startswith("@") else f"/{stage}"
    env = {
        **os.environ,
        "LOCKGATE_MODEL_URI": f"models:/{spec.tracking.registered_model}{ref}",
        "LOCKGATE_SERVICE_CONFIG": json.dumps(service_config(spec.package)),
        "LOCKGATE_REQUEST_LOG": str(request_log_path(pipeline).resolve()),
        "LOCKGATE_MODEL_CACHE": str((settings.cache_dir / "registry").resolve()),
    }
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "bentos.llm_service:LLMService",
        "--host",
        settings.host,
        "--port",
        str(port),
    ]
    typer.echo(f"serving {env['LOCKGATE_MODEL_URI']} on http://{settings.host}:{port} (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(command, env=env, cwd=Path(__file__).resolve().parent.parent))


@app.command()
def profile(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name (labels the output).")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    url: Annotated[
        str | None, typer.Option(help="The service; default: what `lockgate serve` starts on port 3000.")
    ] = None,
    n: Annotated[int, typer.Option("-n", "--requests", min=1, max=100_000, help="Requests to send.")] = 50,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="Requests in flight at once.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens each request asks for.")] = 16,
    api_key: Annotated[
        str | None, typer.Option(envvar="LOCKGATE_API_KEY", help="Bearer key when the service has keys.")
    ] = None,
    as_json: JsonOut = False,
) -> None:
    """Send N requests and print the per-phase latency breakdown at p50/p99 (exercise 9.8): network,
    auth, tokenization, queue wait, prefill, decode, post-processing, from the Server-Timing header."""
    from bentos.profiling import format_table
    from bentos.profiling import profile as run_profile

    label = _pipeline_name(file, pipeline) if pipeline is not None or file.is_file() else "-"
    if url is None:
        from tasks.settings import get_settings

        url = f"http://{get_settings().host}:3000"
    result = run_profile(url, n, concurrency=concurrency, max_new_tokens=max_new_tokens, api_key=api_key)
    if as_json:
        payload = {"pipeline": label, "url": url, "requests": n, "concurrency": concurrency}
        typer.echo(json.dumps({**payload, "phases": result.summary(), "failures": result.failures}))
    else:
        typer.echo(
            f"{label} @ {url}: {n} requests, concurrency {concurrency}, max_new_tokens {max_new_tokens}"
        )
        typer.echo(format_table(result))
        for failure in result.failures[:5]:
            typer.echo(f"failed: {failure}", err=True)
    if result.failures:
        raise typer.Exit(1)


keys_app = typer.Typer(help="API keys of the LLM service (only hashes are stored).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    customer: Annotated[str, typer.Argument(help="Who the key is for (the cost metric's label).")],
    rate_per_s: Annotated[float, typer.Option(help="Sustained requests per second.")] = 10.0,
    burst: Annotated[float, typer.Option(help="Requests allowed at once.")] = 20.0,
) -> None:
    """Create a key; prints it once. Serve with LOCKGATE_API_KEYS_FILE pointing at the key file."""
    from bentos.auth import add_key

    path = Path(os.environ.get("LOCKGATE_API_KEYS_FILE", ".lockgate/api-keys.json"))
    key = add_key(path, customer, rate_per_s, burst)
    typer.echo(f"{key}\n(stored as a sha256 hash in {path}; this is the only time the key is shown)")


flags_app = typer.Typer(
    help="Feature flags (bentos/feature_flags.py): rollout by consistent hashing on the user id; "
    "services re-read the file on change.",
    no_args_is_help=True,
)
app.add_typer(flags_app, name="flags")


def _flags_path() -> Path:
    return Path(os.environ.get("LOCKGATE_FEATURE_FLAGS_FILE", ".lockgate/feature-flags.json"))


@flags_app.command("set")
def flags_set(
    name: Annotated[str, typer.Argument(help="Flag name.")],
    rollout: Annotated[float, typer.Option(min=0, max=100, help="Percent of users who get it.")],
    disabled: Annotated[bool, typer.Option("--disabled", help="Switch it off for everyone.")] = False,
    description: Annotated[str | None, typer.Option(help="What the flag switches.")] = None,
    value: Annotated[
        int | None, typer.Option(min=1, help="Setting of a value flag, e.g. max_new_tokens_cap's token cap.")
    ] = None,
) -> None:
    """Create or change a flag; running services pick it up without a restart. The service acts on
    stop_at_newline (answers end at the first line break) and max_new_tokens_cap (--value caps
    max_new_tokens) for the users each is on for."""
    from bentos.feature_flags import FlagFileError, set_flag

    try:
        flag = set_flag(_flags_path(), name, rollout, not disabled, description, value)
    except FlagFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setting = f", value {flag.value}" if flag.value is not None else ""
    state = "on" if flag.enabled else "off"
    typer.echo(f"{name}: {state} for {flag.rollout:g}% of users{setting} ({_flags_path()})")


@flags_app.command("list")
def flags_list(
    user: Annotated[str | None, typer.Option(help="Also say whether each flag is on for this user.")] = None,
    as_json: JsonOut = False,
) -> None:
    """The flags in the flag file."""
    from bentos.feature_flags import evaluate, read_flag_file

    flags = read_flag_file(_flags_path()).flags
    rows = {
        name: {**flag.model_dump(), **({"on_for_user": evaluate(flag, name, user)} if user else {})}
        for name, flag in sorted(flags.items())
    }
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for name, row in rows.items():
        extra = f"  {user}: {'on' if row['on_for_user'] else 'off'}" if user else ""
        state = "on " if row["enabled"] else "off"
        typer.echo(f"{name:<30} {state} {row['rollout']:>5g}%  {row['description']}{extra}")


export_app = typer.Typer(help="Deployment outputs.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("k8s")
def export_k8s(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    image: Annotated[str, typer.Option(help="Container image of the bento (bentoml containerize).")] = "",
    replicas: Annotated[int, typer.Option(min=1, help="Replicas.")] = 2,
    mlflow_uri: Annotated[str, typer.Option(help="Tracking URI the pods read the registry from.")] = (
        "http://mlflow:5000"
    ),
) -> None:
    """Print Deployment + Service manifests (YAML) for the pipeline's service."""
    import yaml

    from flows.spec_loader import load_spec
    from tasks.k8s_export import manifests

    pipeline = _pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    image = image or f"{spec.package.service_name}:latest"
    docs = manifests(pipeline, spec, image, replicas, mlflow_uri)
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Open the MLflow UI on 127.0.0.1 over the lockgate store."""
    from tasks.settings import export_environment, get_settings

    export_environment()
    settings = get_settings()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if settings.tracking_uri.startswith("sqlite:"):
        command += ["--default-artifact-root", settings.artifact_root]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(command, env=env))


alerts_app = typer.Typer(
    help="Prometheus alert rules and Alertmanager routing from the spec.", no_args_is_help=True
)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("export")
def alerts_export(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    out: Annotated[Path | None, typer.Option(help="Folder; default: <reports>/<pipeline>/alerting.")] = None,
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Write <pipeline>-rules.yml and <pipeline>-alertmanager.yml; check them with promtool/amtool."""
    from flows.spec_loader import load_spec

    pipeline = _pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from tasks.alerting import write_alerting_files
    from tasks.settings import get_settings

    folder = out or get_settings().reports_dir / pipeline / "alerting"
    try:
        files = write_alerting_files(folder, pipeline, spec.tracking.registered_model, spec.monitor)
    except LockgateError as exc:
        raise _fail(exc, verbose) from None
    payload = {
        "rules": str(files.rules),
        "alertmanager": str(files.alertmanager),
        "checked_with": list(files.checked_with),
        "skipped": list(files.skipped),
    }
    if as_json:
        typer.echo(json.dumps(payload))
        return
    typer.echo(f"rules        {files.rules}\nalertmanager {files.alertmanager}")
    for tool in files.checked_with:
        typer.echo(f"checked with {tool}: ok")
    for reason in files.skipped:
        typer.echo(f"not checked: {reason}", err=True)


if __name__ == "__main__":
    app()
