"""Serving commands: serve, profile, keys, flags, export, ui, alerts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lockgate.bentos.auth import is_loopback
from lockgate.bentos.profiling import Endpoint
from lockgate.tasks.platform.errors import LockgateError

if TYPE_CHECKING:
    pass

from lockgate.flows.commands.common import (
    JsonOut,
    SpecFile,
    Verbose,
    fail,
    pipeline_name,
)


def serve(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    port: Annotated[int, typer.Option(help="Port on LOCKGATE_HOST.")] = 3000,
    alias: Annotated[
        str, typer.Option(help="Registry alias to follow: champion (Production) or challenger (Staging).")
    ] = "champion",
    stage: Annotated[
        str | None, typer.Option(help="Follow a registry stage instead of an alias (e.g. Production).")
    ] = None,
    replica: Annotated[
        str | None, typer.Option(help="This router replica's id (its live log file); default HOST-PORT.")
    ] = None,
    direct: Annotated[
        bool, typer.Option("--direct", help="One service following --alias/--stage, without the router.")
    ] = False,
    no_keys: Annotated[
        bool, typer.Option("--no-keys", help="Serve without API keys on a non-loopback address (unsafe).")
    ] = False,
) -> None:
    """The production entry point: a router (bentos/router.py) serving Production and, while a live
    canary runs, the registry's share of requests to the candidate (sticky by user, failover to stable).
    Start several with different --port/--replica: they route alike. --direct: the bare service, following
    ``models:/NAME@ALIAS`` (an alias move — every promotion and rollback moves ``champion`` — hot-swaps).

    API keys: LOCKGATE_API_KEYS_FILE, else LOCKGATE_HOME/api-keys.json when it exists (`lockgate keys
    add`). Binding a non-loopback LOCKGATE_HOST requires keys unless --no-keys. SIGTERM or Ctrl-C stops
    the whole tree (the router or BentoML's supervisor, and their workers)."""
    from lockgate.flows.spec_loader import load_spec

    pipeline = pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from lockgate.bentos.config import ModelUri, ServiceEnv
    from lockgate.tasks.platform.settings import export_environment, get_settings

    export_environment()
    settings = get_settings()
    from lockgate.flows.monitor import request_log_path
    from lockgate.tasks.release.live import live_dir

    model = spec.tracking.registered_model
    uri = ModelUri.stage(model, stage) if stage else ModelUri.alias(model, alias.removeprefix("@"))
    # Starts from what this shell says (API keys, feature flags, text logging), then the pipeline's.
    service = ServiceEnv.from_env(os.environ)
    keys_file = service.api_keys_file or (
        settings.api_keys_file if settings.api_keys_file.is_file() else None
    )
    if keys_file is None and not is_loopback(settings.host) and not no_keys:
        raise fail(
            f"error: serving on {settings.host} (not loopback) needs API keys: create one with "
            f"`lockgate keys add <customer>` (stored in {settings.api_keys_file}), or pass --no-keys",
            code=2,
        )
    service = service.model_copy(
        update={
            "api_keys_file": keys_file.resolve() if keys_file is not None else None,
            "model_uri": uri,
            "config": spec.package.service_config(),
            "request_log": request_log_path(pipeline).resolve(),
            "model_cache": (settings.cache_dir / "registry").resolve(),
        }
    )
    env = service.process_env(os.environ)
    from lockgate.tasks.release.serving import serving_python

    # One choice for a direct service and the router's per-version services alike.
    python = serving_python(service.config, uri, settings.tracking_uri)
    typer.echo(f"service python: {python.executable} ({python.reason})")
    if direct:
        command = [python.executable, "-m", "bentoml", "serve", "lockgate.bentos.llm_service:LLMService"]
        what = str(uri)
    else:
        from lockgate.bentos.router import RouterSettings

        router = RouterSettings(
            model=model,
            replica=replica or f"{settings.host}-{port}".replace(":", "_"),
            live_log_dir=live_dir(model).resolve(),
            live_log_url=settings.live_log_url,  # the readers (release, canary watch) read the same
            host=settings.host,
            service_python=python.executable,
        )
        env.update(router.to_env())
        command = [sys.executable, "-m", "uvicorn", "--factory", "lockgate.bentos.router:create_app"]
        what = f"{model} (router: Production + live canary share from the registry)"
    command += ["--host", settings.host, "--port", str(port)]
    from lockgate.bentos.processes import run_service

    auth = f"API keys from {keys_file}" if keys_file is not None else "no API keys"
    typer.echo(f"serving {what} on http://{settings.host}:{port}, {auth} (Ctrl-C to stop)")
    raise typer.Exit(run_service(command, env, Path(__file__).resolve().parents[2]))


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
    endpoint: Annotated[
        Endpoint, typer.Option(help="generate: POST /generate; chat: the OpenAI API's /v1/chat/completions.")
    ] = "generate",
    as_json: JsonOut = False,
) -> None:
    """Send N requests and print the per-phase latency breakdown at p50/p99 (exercise 9.8): network,
    auth, tokenization, queue wait, prefill, decode, post-processing, from the Server-Timing header."""
    from lockgate.bentos.profiling import format_table
    from lockgate.bentos.profiling import profile as run_profile

    label = pipeline_name(file, pipeline) if pipeline is not None or file.is_file() else "-"
    if url is None:
        from lockgate.tasks.platform.settings import get_settings

        url = f"http://{get_settings().host}:3000"
    _check_reachable(url)
    result = run_profile(
        url, n, concurrency=concurrency, max_new_tokens=max_new_tokens, api_key=api_key, endpoint=endpoint
    )
    if not result.samples:  # nothing to tabulate: one line naming the first failure, not a NaN table
        first = result.failures[0] if result.failures else "no answers"
        raise fail(f"{url}: all {n} requests failed; first: {first}", code=1)
    if as_json:
        payload = {
            "pipeline": label,
            "url": url,
            "endpoint": endpoint,
            "requests": n,
            "concurrency": concurrency,
        }
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


def _check_reachable(url: str) -> None:
    """Exit with one clear line when nothing answers at ``url`` (before sending N requests)."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/livez", timeout=5)
    except httpx.HTTPError as exc:
        raise fail(
            f"{url}: no service answers ({type(exc).__name__}); start one with `lockgate serve`",
            code=1,
        ) from None


keys_app = typer.Typer(help="API keys of the LLM service (only hashes are stored).", no_args_is_help=True)


@keys_app.command("add")
def keys_add(
    customer: Annotated[str, typer.Argument(help="Who the key is for (the cost metric's label).")],
    rate_per_s: Annotated[float, typer.Option(help="Sustained requests per second.")] = 10.0,
    burst: Annotated[float, typer.Option(help="Requests allowed at once.")] = 20.0,
) -> None:
    """Create a key; prints it once. Stored (as a hash, file mode 0600) in LOCKGATE_API_KEYS_FILE, else
    LOCKGATE_HOME/api-keys.json, which `lockgate serve` then uses."""
    from lockgate.bentos.auth import add_key
    from lockgate.bentos.config import ServiceEnv
    from lockgate.tasks.platform.settings import get_settings

    path = ServiceEnv.from_env(os.environ).api_keys_file or get_settings().api_keys_file
    key = add_key(path, customer, rate_per_s, burst)
    typer.echo(f"{key}\n(stored as a sha256 hash in {path}; this is the only time the key is shown)")


flags_app = typer.Typer(
    help="Feature flags (bentos/feature_flags.py): rollout by consistent hashing on the user id; "
    "services re-read the file on change.",
    no_args_is_help=True,
)


def _flags_path() -> Path:
    from lockgate.bentos.config import FEATURE_FLAGS_FILE_VARIABLE

    return Path(os.environ.get(FEATURE_FLAGS_FILE_VARIABLE, ".lockgate/feature-flags.json"))


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
    from lockgate.bentos.feature_flags import FlagFileError, set_flag

    try:
        flag = set_flag(_flags_path(), name, rollout, not disabled, description, value)
    except FlagFileError as exc:
        raise fail(f"error: {exc}", code=2) from None
    setting = f", value {flag.value}" if flag.value is not None else ""
    state = "on" if flag.enabled else "off"
    typer.echo(f"{name}: {state} for {flag.rollout:g}% of users{setting} ({_flags_path()})")


@flags_app.command("list")
def flags_list(
    user: Annotated[str | None, typer.Option(help="Also say whether each flag is on for this user.")] = None,
    as_json: JsonOut = False,
) -> None:
    """The flags in the flag file."""
    from lockgate.bentos.feature_flags import evaluate, read_flag_file

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


@export_app.command("k8s")
def export_k8s(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    image: Annotated[str, typer.Option(help="Container image of the bento (bentoml containerize).")] = "",
    replicas: Annotated[int, typer.Option(min=1, help="Replicas.")] = 2,
    mlflow_uri: Annotated[str, typer.Option(help="Tracking URI the pods read the registry from.")] = (
        "http://mlflow:5000"
    ),
    rollout: Annotated[
        bool, typer.Option("--rollout", help="An Argo Rollouts Rollout + AnalysisTemplate instead.")
    ] = False,
    stable_version: Annotated[str, typer.Option(help="--rollout: the stable registry version.")] = "1",
    canary_version: Annotated[str, typer.Option(help="--rollout: the canary registry version.")] = "2",
    analysis_url: Annotated[
        str, typer.Option(help="--rollout: where `lockgate analysis-server` answers.")
    ] = "http://lockgate-analysis:8080",
    alias: Annotated[str, typer.Option(help="Registry alias the pods follow.")] = "champion",
) -> None:
    """Print Deployment + Service manifests (YAML) for the pipeline's service; with --rollout an Argo
    Rollouts Rollout (the canary steps as setWeight/pause) + Service + an AnalysisTemplate asking
    lockgate's analysis endpoint for pass / fail / inconclusive."""
    import yaml

    from lockgate.flows.spec_loader import load_spec
    from lockgate.tasks.platform import k8s_export

    pipeline = pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    image = image or f"{spec.package.service_name}:latest"
    if rollout:
        docs = [
            k8s_export.rollout_manifest(
                pipeline, spec, image, replicas, mlflow_uri, (stable_version, canary_version), analysis_url
            ),
            k8s_export.service_manifest(pipeline, spec),
            k8s_export.analysis_template_manifest(spec),
        ]
    else:
        docs = k8s_export.manifests(pipeline, spec, image, replicas, mlflow_uri, alias.removeprefix("@"))
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


@export_app.command("compressed-tensors")
def export_compressed_tensors(
    folder: Annotated[Path, typer.Argument(help="A lockgate quantized folder (a compress candidate's).")],
    out: Annotated[Path, typer.Argument(help="Folder to write (replaced if it exists).")],
) -> None:
    """Write a lockgate INT8/INT4 candidate as a compressed-tensors checkpoint, the format vLLM
    (`vllm serve OUT`) and transformers load: the same integer codes and scales, not requantized."""
    from lockgate.bentos.compressed_export import ExportError, export

    try:
        written = export(folder, out)
    except (ExportError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(written))


def analysis_server(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline whose canary analysis to apply.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    port: Annotated[int, typer.Option(help="Port on LOCKGATE_HOST.")] = 8080,
) -> None:
    """Serve lockgate's canary analysis over HTTP (GET /analysis?model=&stable=&canary=&window_s=):
    pass / fail / inconclusive from the routers' live request logs (for Argo Rollouts' web metric)."""
    import uvicorn

    from lockgate.flows.spec_loader import load_spec
    from lockgate.tasks.platform.settings import export_environment, get_settings
    from lockgate.tasks.release.analysis_endpoint import create_app

    export_environment()
    pipeline = pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    uvicorn.run(create_app(spec.canary), host=get_settings().host, port=port, log_level="warning")


def ui(
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: 5000, Prefect 4200).")] = None,
    prefect: Annotated[
        bool,
        typer.Option(
            "--prefect", help="Open the Prefect UI over lockgate's local Prefect state instead of MLflow's."
        ),
    ] = False,
) -> None:
    """Open the MLflow UI (or with --prefect the Prefect UI) on 127.0.0.1 over the lockgate store.

    Releases run against a temporary Prefect API that stops with the run, but its state stays in
    LOCKGATE_HOME/prefect: `ui --prefect` serves it, so the flow-run link `lockgate run` prints opens."""
    from lockgate.tasks.platform.settings import export_environment, get_settings

    export_environment()
    settings = get_settings()
    if prefect:
        from lockgate.flows.story import PREFECT_UI_PORT

        port = port or PREFECT_UI_PORT
        env = {**os.environ, "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
        env.pop("PREFECT_API_URL", None)  # the server serves the local state, not another server
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        typer.echo(f"Prefect UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
        raise typer.Exit(subprocess.call([*command, "--port", str(port)], env=env))
    port = port or 5000
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


@alerts_app.command("export")
def alerts_export(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name; default: the first.")] = None,
    file: SpecFile = Path("pipelines.yaml"),
    out: Annotated[Path | None, typer.Option(help="Folder; default: <reports>/<pipeline>/alerting.")] = None,
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Write <pipeline>-rules.yml and <pipeline>-alertmanager.yml; check them with promtool/amtool."""
    from lockgate.flows.spec_loader import load_spec

    pipeline = pipeline_name(file, pipeline)
    spec = load_spec(file).pipelines[pipeline]
    from lockgate.tasks.monitoring.alerting import write_alerting_files
    from lockgate.tasks.platform.settings import get_settings

    folder = out or get_settings().reports_dir / pipeline / "alerting"
    try:
        files = write_alerting_files(folder, pipeline, spec.tracking.registered_model, spec.monitor)
    except LockgateError as exc:
        raise fail(exc, verbose=verbose) from None
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


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(profile)
    app.add_typer(keys_app, name="keys")
    app.add_typer(flags_app, name="flags")
    app.add_typer(export_app, name="export")
    app.command()(ui)
    app.command("analysis-server")(analysis_server)
    app.add_typer(alerts_app, name="alerts")
