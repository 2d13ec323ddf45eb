"""A local team stack (`lockgate up` / `lockgate down`): the topology a team runs, on one machine.

* **PostgreSQL** (Debian's binaries): one cluster initialised under ``$LOCKGATE_HOME/team-stack/postgres``,
  on a free loopback port, with three databases — ``mlflow`` (tracking + registry), ``prefect`` (the
  Prefect server's state) and ``lockgate`` (the release-lock table, `tasks/release/lock.py`).
  PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
* **MLflow tracking server** on that database, serving artifacts itself (``--serve-artifacts``) from a
  configurable destination, so workers upload through the server and never need the artifact store's
  credentials.
* **Prefect server** (its own state in Postgres), a **process work pool** and N **process workers**.
  An automation marks a flow run **Crashed** when its heartbeats stop (a worker killed with its run):
  without it such a run would stay Running forever.

Everything binds 127.0.0.1. The URLs go to a state file (``stack.json``, mode 0600: it holds the
generated database password) and an ``env`` file of ``export`` lines; `lockgate up --print-env`
prints the same lines for ``eval``. The password is generated per stack, never part of the spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from lockgate.tasks.platform.errors import LockgateError
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.settings import Settings, get_settings

log = get_logger(__name__)

STATE_FILE = "stack.json"
ENV_FILE = "env"
DB_USER = "lockgate"
DATABASES = ("mlflow", "prefect", "lockgate")
#: Seconds between flow-run heartbeats on stack workers (Prefect's minimum is 30).
HEARTBEAT_S = 30
#: A run whose heartbeat is this late is marked Crashed (two missed beats plus slack).
CRASH_AFTER_S = 75
CRASH_AUTOMATION = "lockgate: crash flow runs whose heartbeats stopped"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
    "install them with `make postgres` (runs scripts/install-postgres.sh: apt-get install -y postgresql), "
    "or point LOCKGATE_POSTGRES_BIN at the folder that holds them"
)


class StackError(LockgateError):
    """The local team stack could not be started, found or stopped."""


@dataclass
class StackState:
    """What `lockgate up` started, as written to ``stack.json``."""

    home: str
    postgres_data: str
    postgres_port: int
    db_password: str
    mlflow_url: str
    prefect_api_url: str
    artifacts_destination: str
    work_pool: str
    #: name -> process id; each process leads its own process group (session).
    processes: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    def database_url(self, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{DB_USER}:{self.db_password}@127.0.0.1:{self.postgres_port}/{database}"


def stack_environment(state: StackState) -> dict[str, str]:
    """What clients and workers export to use the stack (settings, plus Prefect's own variable)."""
    return {
        "LOCKGATE_HOME": state.home,
        "LOCKGATE_MLFLOW_TRACKING_URI": state.mlflow_url,
        "MLFLOW_TRACKING_URI": state.mlflow_url,
        "LOCKGATE_PREFECT_API_URL": state.prefect_api_url,
        "PREFECT_API_URL": state.prefect_api_url,
        "LOCKGATE_LOCK_URL": state.database_url("lockgate"),
        # Every router replica started in team mode logs live requests to one table the release reads.
        "LOCKGATE_LIVE_LOG_URL": state.database_url("lockgate"),
        "LOCKGATE_WORK_POOL": state.work_pool,
    }


def read_state(settings: Settings | None = None) -> StackState | None:
    path = (settings or get_settings()).stack_dir / STATE_FILE
    if not path.exists():
        return None
    return StackState(**json.loads(path.read_text()))


def _write_state(state: StackState, stack_dir: Path) -> None:
    stack_dir.mkdir(parents=True, exist_ok=True)
    path = stack_dir / STATE_FILE
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle, indent=2)
    os.replace(path.with_suffix(".tmp"), path)
    fd = os.open(stack_dir / ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(export_lines(state))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the OS picks it); a server started next binds it."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def postgres_bin_dir(settings: Settings | None = None) -> Path:
    """Where initdb and pg_ctl live, or :class:`StackError` saying how to install them."""
    s = settings or get_settings()
    if s.postgres_bin is not None:
        if not (s.postgres_bin / "initdb").exists():
            raise StackError(f"LOCKGATE_POSTGRES_BIN={s.postgres_bin} holds no initdb; {INSTALL_HINT}")
        return s.postgres_bin
    # Debian keeps the server binaries out of PATH (only the psql wrappers are there).
    candidates = (
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
        if Path("/usr/lib/postgresql").is_dir()
        else []
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.insert(0, Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise StackError(INSTALL_HINT)


def _as_postgres() -> dict[str, object]:
    """Popen arguments that run a command as the ``postgres`` user when we are root (PostgreSQL
    refuses root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "running as root, but there is no `postgres` user to run PostgreSQL as (it refuses root); "
            "install Debian's postgresql package (`make postgres`), which creates it"
        ) from None
    return {"user": "postgres", "group": "postgres"}


def _run(cmd: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise StackError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done


def _init_postgres(bin_dir: Path, pg_root: Path, password: str) -> Path:
    """initdb a cluster in ``pg_root/data`` (once); password auth for the ``lockgate`` role."""
    data = pg_root / "data"
    if (data / "PG_VERSION").exists():
        return data
    pg_root.mkdir(parents=True, exist_ok=True)
    as_pg = _as_postgres()
    if as_pg:
        shutil.chown(pg_root, "postgres", "postgres")
        os.chmod(pg_root, 0o700)
        reach = subprocess.run(["test", "-w", str(pg_root)], check=False, **as_pg)  # type: ignore[call-overload]
        if reach.returncode != 0:
            raise StackError(
                f"the postgres user cannot reach {pg_root}: a parent folder is not searchable by other "
                "users (chmod o+x), or set LOCKGATE_HOME to a folder under one that is"
            )
    pwfile = pg_root / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    if as_pg:
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                DB_USER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            "initdb",
            cwd=pg_root,
            **as_pg,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    return data


def _start_postgres(bin_dir: Path, data: Path, port: int) -> None:
    # TCP on loopback only; no Unix socket (its default folder, /var/run/postgresql, is the system
    # cluster's). pg_ctl -w waits until the server accepts connections.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    _run(
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(data.parent / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        "pg_ctl start (log: " + str(data.parent / "postgres.log") + ")",
        cwd=data.parent,
        **_as_postgres(),
    )


def _stop_postgres(bin_dir: Path, data: Path) -> None:
    if not (data / "postmaster.pid").exists():
        return
    _run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
        "pg_ctl stop",
        cwd=data.parent,
        **_as_postgres(),
    )


def _create_databases(port: int, password: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None) -> int:
    """Start a server in its own session (so `down` stops it with its children); output to a log."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )
    return proc.pid


def _wait_http(url: str, name: str, pid: int, log_file: Path, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise StackError(f"{name} exited while starting; its log: {log_file}\n{_tail(log_file)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout_s:.0f}s; its log: {log_file}")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        # A zombie child of ours (we never wait for it) counts as gone.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _stop_group(pid: int, timeout_s: float = 20) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if not _group_alive(pid):
            return


def _group_alive(pgid: int) -> bool:
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the stack's servers and workers: the caller's, minus variables that would point a
    server at another store, plus quiet defaults."""
    env = dict(base if base is not None else os.environ)
    env.update(
        {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey consumers: clean 1 s shutdown
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def worker_environment(state: StackState, base: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: the stack's URLs and heartbeats for crash detection. Flow runs inherit
    it (the process worker starts them with its own environment), LOCKGATE_DEMO_CACHE included."""
    env = server_environment(base)
    env.update(stack_environment(state))
    env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)
    # Read when prefect is imported, before the flow's own export_environment(): set it here so
    # lockgate's log lines reach the run logs on the server.
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lockgate")
    env["PREFECT_HOME"] = str(Path(state.home) / "prefect")  # local files only; state is on the server
    return env


def worker_command(pool: str, name: str | None = None) -> list[str]:
    command = [*_prefect_cli(), "worker", "start", "--pool", pool, "--type", "process"]
    return [*command, "--name", name] if name else command


def start_worker(state: StackState, name: str, settings: Settings | None = None) -> int:
    """Start one more process worker of the stack's pool; recorded in the state file."""
    s = settings or get_settings()
    repo = Path(__file__).resolve().parents[2]
    pid = _spawn(
        name, worker_command(state.work_pool, name), worker_environment(state), s.stack_dir / "logs", cwd=repo
    )
    state.processes[name] = pid
    _write_state(state, s.stack_dir)
    return pid


async def _configure_prefect(pool: str) -> None:
    """The process work pool (with the process worker's default job template) and the crash
    automation: a run whose heartbeats stop without a final state becomes Crashed."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        if await client.read_automations_by_name(CRASH_AUTOMATION):
            return
        final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
        await client.create_automation(
            AutomationCore(
                name=CRASH_AUTOMATION,
                trigger=EventTrigger(
                    after={"prefect.flow-run.heartbeat"},
                    expect={"prefect.flow-run.heartbeat", *final},
                    match={"prefect.resource.id": ["prefect.flow-run.*"]},
                    for_each={"prefect.resource.id"},
                    posture=Posture.Proactive,
                    threshold=1,
                    within=timedelta(seconds=CRASH_AFTER_S),
                ),
                actions=[
                    ChangeFlowRunState(
                        state=StateType.CRASHED,
                        message=f"no heartbeat for {CRASH_AFTER_S}s: its worker or machine died",
                    )
                ],
            )
        )


def up(
    settings: Settings | None = None,
    workers: int = 1,
    artifacts_destination: str | None = None,
) -> StackState:
    """Start PostgreSQL, the MLflow server, the Prefect server, the work pool and ``workers`` workers.

    Idempotent: a stack that is already up is returned as it is."""
    s = settings or get_settings()
    existing = read_state(s)
    if existing is not None and existing.processes and all(_alive(p) for p in existing.processes.values()):
        return existing
    if existing is not None:
        log.warning("a previous stack was not stopped cleanly; stopping what is left of it")
        down(s)
    bin_dir = postgres_bin_dir(s)
    stack_dir = s.stack_dir.resolve()
    home = s.home.resolve()
    logs = stack_dir / "logs"
    password = secrets.token_urlsafe(24)
    destination = artifacts_destination or str(stack_dir / "mlartifacts")
    state = StackState(
        home=str(home),
        postgres_data=str(stack_dir / "postgres" / "data"),
        postgres_port=free_port(),
        db_password=password,
        mlflow_url="",
        prefect_api_url="",
        artifacts_destination=destination,
        work_pool=s.work_pool,
        started_at=time.time(),
    )
    secret_file = stack_dir / "postgres.secret"
    if secret_file.exists():  # the cluster outlives `down`: its password is kept next to it
        state.db_password = secret_file.read_text().strip()
    else:
        stack_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
    data = _init_postgres(bin_dir, stack_dir / "postgres", state.db_password)
    _write_state(state, stack_dir)  # from here on, `down` can clean up a half-started stack
    _start_postgres(bin_dir, data, state.postgres_port)
    _create_databases(state.postgres_port, state.db_password)

    env = server_environment()
    mlflow_port = free_port()
    state.mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    # The store URI travels in the environment (mlflow reads MLFLOW_BACKEND_STORE_URI), so the
    # password does not show in `ps`.
    mlflow_env = {**env, "MLFLOW_BACKEND_STORE_URI": state.database_url("mlflow")}
    state.processes["mlflow"] = _spawn(
        "mlflow",
        mlflow_server_command(mlflow_port, destination),
        mlflow_env,
        logs,
    )
    prefect_port = free_port()
    state.prefect_api_url = f"http://127.0.0.1:{prefect_port}/api"
    prefect_env = {
        **env,
        "PREFECT_HOME": str(stack_dir / "prefect-server"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": state.database_url("prefect", "asyncpg"),
    }
    prefect_env.pop("PREFECT_API_URL", None)
    state.processes["prefect"] = _spawn(
        "prefect",
        [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        prefect_env,
        logs,
    )
    _write_state(state, stack_dir)
    _wait_http(f"{state.mlflow_url}/health", "MLflow server", state.processes["mlflow"], logs / "mlflow.log")
    _wait_http(
        f"{state.prefect_api_url}/health", "Prefect server", state.processes["prefect"], logs / "prefect.log"
    )
    _with_prefect_api(state.prefect_api_url, _configure_prefect, state.work_pool)
    for index in range(workers):
        start_worker(state, f"lockgate-worker-{index + 1}", s)
    _write_state(state, stack_dir)
    log.info(
        "team stack up: MLflow %s, Prefect %s, pool %s",
        state.mlflow_url,
        state.prefect_api_url,
        state.work_pool,
    )
    return state


def mlflow_server_command(port: int, destination: str) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--serve-artifacts", "--artifacts-destination", destination,
    ]  # fmt: skip


def restart_mlflow(settings: Settings | None = None) -> StackState:
    """Stop the MLflow server and start it again on the same port (what an upgrade or a crash-restart
    does); clients retry through the gap (MLFLOW_HTTP_REQUEST_MAX_RETRIES, backoff)."""
    s = settings or get_settings()
    state = read_state(s)
    if state is None:
        raise StackError(f"no team stack in {s.stack_dir}: run `lockgate up` first")
    _stop_group(state.processes["mlflow"])
    port = int(state.mlflow_url.rsplit(":", 1)[1])
    env = {**server_environment(), "MLFLOW_BACKEND_STORE_URI": state.database_url("mlflow")}
    logs = s.stack_dir.resolve() / "logs"
    state.processes["mlflow"] = _spawn(
        "mlflow", mlflow_server_command(port, state.artifacts_destination), env, logs
    )
    _write_state(state, s.stack_dir)
    _wait_http(f"{state.mlflow_url}/health", "MLflow server", state.processes["mlflow"], logs / "mlflow.log")
    return state


def _with_prefect_api(url: str, fn, *args: object) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        asyncio.run(fn(*args))


def down(settings: Settings | None = None) -> list[str]:
    """Stop workers, then the servers, then PostgreSQL. The data stays (the next `up` reuses it)."""
    s = settings or get_settings()
    state = read_state(s)
    if state is None:
        return []
    stopped = []
    # Workers first (they would otherwise log connection errors), servers next, the database last.
    order = sorted(state.processes, key=lambda n: (n in ("mlflow", "prefect"), n))
    for name in order:
        _stop_group(state.processes[name])
        stopped.append(name)
    data = Path(state.postgres_data)
    if (data / "postmaster.pid").exists():
        _stop_postgres(postgres_bin_dir(s), data)
        stopped.append("postgres")
    (s.stack_dir / STATE_FILE).unlink(missing_ok=True)
    (s.stack_dir / ENV_FILE).unlink(missing_ok=True)
    return stopped


def export_lines(state: StackState) -> str:
    """``export`` lines for ``eval $(lockgate up --print-env)``."""
    return "".join(f"export {k}='{v}'\n" for k, v in stack_environment(state).items())
