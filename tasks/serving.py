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

from bentos.processes import stop_service
from tasks.errors import StageFailed
from tasks.log import get_logger
from tasks.settings import export_environment, get_settings

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


def _model_labels(model_uri: str) -> dict[str, str]:
    """Metric/log labels for a pinned registry URI (``models:/NAME/VERSION``)."""
    parts = model_uri.removeprefix("models:/").split("/")
    if model_uri.startswith("models:/") and len(parts) == 2 and parts[1].isdigit():
        return {"LOCKGATE_MODEL_NAME": parts[0], "LOCKGATE_MODEL_VERSION": parts[1]}
    return {}


def launch_service(
    target: str,
    role: str,
    model_uri: str,
    request_log: Path,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    torch_threads: int | None = None,
) -> ServiceProcess:
    """Start ``bentoml serve TARGET`` (a bento tag or ``module:Service``) for one model; no waiting.

    ``torch_threads`` caps intra-op threads: services sharing a small machine would otherwise each
    start one thread per core and oversubscribe it, which shows up as latency spikes."""
    settings = get_settings()
    port = free_port(settings.host)
    env = {
        **os.environ,
        **export_environment(settings),
        "LOCKGATE_MODEL_URI": model_uri,
        **_model_labels(model_uri),
        "LOCKGATE_SERVICE_ROLE": role,
        "LOCKGATE_REQUEST_LOG": str(request_log.resolve()),
        "LOCKGATE_MODEL_CACHE": str((settings.cache_dir / "registry").resolve()),
        **(
            {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)}
            if torch_threads
            else {}
        ),
        **(extra_env or {}),
    }
    if not (extra_env or {}).get("LOCKGATE_API_KEYS_FILE"):
        # Replayed canary traffic is internal and loopback-only: no API keys unless asked for.
        env.pop("LOCKGATE_API_KEYS_FILE", None)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{port}.log"
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", settings.host, "--port", str(port)]
    with log_path.open("w") as sink:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,  # its own process group, so stop() reaches bentoml's workers too
        )
    return ServiceProcess(role, f"http://{settings.host}:{port}", process, log_path, env)


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
    environment says so): a pid recycled by an unrelated process is left alone. Linux only (/proc);
    elsewhere nothing is stopped. Returns the process groups that were stopped."""
    marker = f"LOCKGATE_MODEL_URI=models:/{model}/".encode()
    stopped: list[int] = []
    for pgid in process_groups:
        try:
            environ = Path(f"/proc/{pgid}/environ").read_bytes()
        except OSError:
            continue  # gone already, or not ours to read
        if marker not in environ:
            continue
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and Path(f"/proc/{pgid}").exists():
            time.sleep(0.2)
        if Path(f"/proc/{pgid}").exists():
            with contextlib.suppress(ProcessLookupError):  # it may exit between the check and the kill
                os.killpg(pgid, signal.SIGKILL)
        stopped.append(pgid)
        log.warning("stopped orphaned %s service (process group %d)", model, pgid)
    return stopped
