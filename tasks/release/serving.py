"""Start and stop BentoML service processes on loopback ports (used by the canary stage and CLI)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from lockgate.bentos.auth import is_loopback
from lockgate.bentos.config import MODEL_URI_VARIABLE, REGISTRY_SCHEME, ModelUri, ServiceConfig, ServiceEnv
from lockgate.bentos.processes import stop_service
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.settings import export_environment, get_settings

log = get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A running ``bentoml serve``; ``stop()`` ends its whole process group."""

    role: str
    url: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15) -> None:
        stop_service(self.process, timeout_s)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


REPO_ROOT = Path(__file__).resolve().parents[2]
#: The data plane's serving environment (``make serve-env``): vLLM and the service, without Prefect.
SERVE_VENV = REPO_ROOT / ".venv-serve"
SERVE_STAMP = ".installed"  # the Makefile's $(SERVE_STAMP), touched once the environment imports vLLM


@dataclass(frozen=True)
class ServingPython:
    """The interpreter a service is started with, and why (logged at every launch)."""

    executable: str
    reason: str


def serving_python(config: ServiceConfig, model_uri: ModelUri, tracking_uri: str) -> ServingPython:
    """The one decision of which python runs a service: the serving environment's when the config's
    ``engine`` may use vLLM (``vllm`` or ``auto``) and .venv-serve exists, else this one (which has no
    vLLM: the service then runs transformers, or refuses ``engine: vllm`` naming the field).

    The serving environment reads every registry (``mlflow-skinny`` with SQLAlchemy: a SQLite store or
    an MLflow server). ``auto`` still keeps a service that follows a local SQLite registry on this
    interpreter: that is the laptop set-up of ``make run`` and the tests, where vLLM's start (minutes
    on 2 cores, for each of the release's services) would cost more than it serves; ``engine: vllm``
    asks for vLLM there explicitly."""
    here = sys.executable
    if config.engine == "transformers":
        return ServingPython(here, "package.engine: transformers")
    python = SERVE_VENV / "bin" / "python"
    # The stamp, not the folder: `make serve-env` writes it last, so a half-built environment (an
    # install in progress or one that failed) is never picked.
    if not (SERVE_VENV / SERVE_STAMP).is_file():
        missing = (
            f"package.engine: {config.engine}, but {SERVE_VENV} is missing or unfinished (make serve-env)"
        )
        return ServingPython(here, missing)
    if config.engine == "auto" and model_uri.is_registry and tracking_uri.startswith("sqlite:"):
        return ServingPython(
            here,
            "package.engine: auto keeps a service following a local SQLite registry on this python "
            "(vLLM's start costs minutes on a laptop); package.engine: vllm serves it with vLLM",
        )
    return ServingPython(str(python), f"package.engine: {config.engine}; the serving environment has vLLM")


def launch_service(
    target: str,
    role: str,
    model_uri: ModelUri | str,
    request_log: Path,
    log_dir: Path,
    config: ServiceConfig | None = None,
    registry_poll_s: float | None = None,
    api_keys_file: Path | None = None,
    feature_flags_file: Path | None = None,
    torch_threads: int | None = None,
) -> ServiceProcess:
    """Start ``bentoml serve TARGET`` (a bento tag or ``module:Service``) for one model; no waiting.

    ``torch_threads`` caps intra-op threads: services sharing a small machine would otherwise each
    start one thread per core and oversubscribe it, which shows up as latency spikes."""
    settings = get_settings()
    # Without keys a service must not be reachable from other machines: the release's own traffic
    # (replay, blue-green, shadow) comes from this one, so a keyless service binds loopback even when
    # LOCKGATE_HOST names a public address (`lockgate serve` refuses that case outright).
    host = settings.host if api_keys_file is not None or is_loopback(settings.host) else "127.0.0.1"
    port = free_port(host)
    uri = model_uri if isinstance(model_uri, ModelUri) else ModelUri.parse(model_uri)
    inherited = ServiceEnv.from_env(os.environ)  # text logging and feature flags as this shell says
    update: dict[str, object] = {
        "model_uri": uri,
        # A pinned registry URI labels metrics and logs with its name and version.
        "model_name": uri.name if uri.kind == "version" else inherited.model_name,
        "model_version": uri.ref if uri.kind == "version" else inherited.model_version,
        "role": role,
        "request_log": request_log.resolve(),
        "model_cache": (settings.cache_dir / "registry").resolve(),
        # Replayed canary traffic is internal and loopback-only: no API keys unless asked for.
        "api_keys_file": api_keys_file,
    }
    if feature_flags_file is not None:
        update["feature_flags_file"] = feature_flags_file
    if config is not None:
        update["config"] = config
    if registry_poll_s is not None:
        update["registry_poll_s"] = registry_poll_s
    service = ServiceEnv.model_validate({**dict(inherited), **update})
    env = service.process_env({**os.environ, **export_environment(settings)})
    if torch_threads:
        env.update(OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{port}.log"
    python = serving_python(service.config, uri, settings.tracking_uri)
    log.info("%s service runs on %s (%s)", role, python.executable, python.reason)
    command = [python.executable, "-m", "bentoml", "serve", target]
    command += ["--host", host, "--port", str(port)]
    with log_path.open("w") as sink:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,  # its own process group, so stop() reaches bentoml's workers too
        )
    return ServiceProcess(role, f"http://{host}:{port}", process, log_path, env)


def start_services(launches: list[dict], ready_timeout_s: float = 180) -> list[ServiceProcess]:
    """Launch several services at once (their start-ups overlap), then wait until all are ready.

    Each dict holds :func:`launch_service` keyword arguments. On any failure all are stopped."""
    services: list[ServiceProcess] = []
    try:
        for kwargs in launches:
            services.append(launch_service(**kwargs))
        for service in services:
            wait_ready(service, ready_timeout_s)
            log.info("%s service ready at %s", service.role, service.url)
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services


def service_engine(service: ServiceProcess) -> str:
    """The engine a ready service runs and why, from its /capacity (e.g. a candidate vLLM cannot load,
    served by transformers)."""
    plan = httpx.get(f"{service.url}/capacity", timeout=10).json()
    choice = plan.get("engine_choice") or {}
    text = f"{plan.get('engine')} ({choice.get('reason', 'no reason given')})"
    log.info("%s service engine: %s", service.role, text)
    return text


def wait_ready(service: ServiceProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise StageFailed(
                "canary",
                f"{service.role} service exited with {service.process.returncode}: {service.log_tail()}",
            )
        try:
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return
            # /livez turns 503 when the model failed to load: fail now instead of waiting out the timeout.
            alive = httpx.get(f"{service.url}/livez", timeout=2)
            if alive.status_code == 503:
                raise StageFailed("canary", f"{service.role} service cannot serve: {alive.text[:1000]}")
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise StageFailed(
        "canary", f"{service.role} service not ready after {timeout_s:.0f}s: {service.log_tail()}"
    )


def stop_orphaned_services(
    process_groups: tuple[int, ...] | list[int], model: str, timeout_s: float = 15
) -> list[int]:
    """Stop services a killed release left running (their process groups, recorded in its release lock).

    A process group is stopped only if its leader still runs a lockgate service of ``model`` (its
    environment says so): a pid recycled by an unrelated process is left alone. Returns the process
    groups that were stopped."""
    marker = f"{REGISTRY_SCHEME}{model}/"
    stopped: list[int] = []
    for pgid in process_groups:
        try:
            leader = psutil.Process(pgid)
            environ = leader.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone already, or not ours to read
        if not environ.get(MODEL_URI_VARIABLE, "").startswith(marker):
            continue
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        _, alive = psutil.wait_procs([leader], timeout=timeout_s)
        if alive:
            with contextlib.suppress(ProcessLookupError):  # it may exit between the check and the kill
                os.killpg(pgid, signal.SIGKILL)
        stopped.append(pgid)
        log.warning("stopped orphaned %s service (process group %d)", model, pgid)
    return stopped
