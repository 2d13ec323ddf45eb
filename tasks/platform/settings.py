"""Where things run — not what to release. Read from the environment (``LOCKGATE_`` prefix).

The spec (pipelines.yaml) says *what* to release; settings say *where*: the MLflow tracking
server, local state folders, the Prefect task runner. Secrets never belong in the spec.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCKGATE_", frozen=True)

    home: Path = Field(Path(".lockgate"), description="Local state: MLflow store, caches, logs.")
    reports_dir: Path = Field(Path("reports"), description="Generated reports.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite in `home` (MLflow refuses ./mlruns)."
    )
    host: str = Field("127.0.0.1", description="Address the services bind to.")
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="Prefect task runner of the release flow's candidate compression "
        "(tasks/platform/task_runners.py): threads in the flow's process, or a Dask cluster.",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of a running Dask cluster (e.g. tcp://dask:8786) for task_runner=dask; "
        "default: a local cluster of `dask_workers` processes started per flow run.",
    )
    dask_workers: int = Field(
        2, ge=1, le=256, description="Worker processes of the local Dask cluster (one thread each)."
    )
    prefect_api_url: str | None = Field(
        None,
        description="A Prefect server's API (http://host:4200/api), exported as PREFECT_API_URL; "
        "default: Prefect's temporary local API (or PREFECT_API_URL when set).",
    )
    prefect_startup_timeout_s: int = Field(
        120,
        ge=1,
        le=3600,
        description="Seconds Prefect's temporary local API may take to start (exported as "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Prefect's own 20 s is too short on a "
        "loaded 2-core machine; a value already set in the environment wins.",
    )
    prefect_startup_attempts: int = Field(
        2, ge=1, le=10, description="Tries to start Prefect's temporary local API before giving up."
    )
    work_pool: str = Field(
        "lockgate", description="Prefect process work pool that `deploy --pool` and `worker` use."
    )
    postgres_bin: Path | None = Field(
        None,
        description="Folder of PostgreSQL's server binaries (initdb, pg_ctl) for `lockgate up`; "
        "default: PATH, then /usr/lib/postgresql/<newest>/bin.",
    )
    demo_train_steps: int | None = Field(
        None, ge=1, description="Override the demo model's pre-training steps (tests use fewer)."
    )
    demo_cache: Path | None = Field(
        None,
        description="Cache folder of the trained demo model (default: `home`/cache). Test sessions "
        "share one so the model trains once per machine, not once per session.",
    )
    model_cache: Path | None = Field(
        None,
        description="Cache folder of models converted from GGUF (model.source: a .gguf file or a "
        "packaged model's short name), keyed by the file's content hash (default: `home`/cache). "
        "Test sessions share one so the conversion runs once per machine.",
    )
    lock_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the release-lock table (tasks/release/lock.py); default: a "
        "SQLite file in `home`. Runners on several hosts must share one database server here.",
    )
    live_log_url: str | None = Field(
        None,
        description="PostgreSQL URL of the live request log every production router replica shares "
        "(bentos/live_store.py; the team stack exports its database here); default: one SQLite file "
        "per replica under `home`/live/<model>, which only replicas sharing this disk can read.",
    )
    release_lock_ttl_s: float = Field(
        900, gt=0, le=86_400, description="A release lock expires this long after its last renewal."
    )

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()

    @property
    def release_lock_url(self) -> str:
        if self.lock_url:
            return self.lock_url
        return f"sqlite:///{(self.home / 'release-locks.sqlite').resolve()}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def demo_model_dir(self) -> Path:
        """Where the trained demo model is cached; shared across homes when ``demo_cache`` is set."""
        return self.demo_cache or self.cache_dir

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def api_keys_file(self) -> Path:
        """The service's API keys (hashes, 0600): `lockgate keys add` writes it, `lockgate serve` uses it."""
        return self.home / "api-keys.json"

    @property
    def request_log_dir(self) -> Path:
        return self.home / "request-logs"

    @property
    def stack_dir(self) -> Path:
        """State of the local team stack (`lockgate up`): databases, logs, the state file."""
        return self.home / "team-stack"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def export_environment(settings: Settings | None = None) -> dict[str, str]:
    """Set the environment the stack's libraries read, and return it for child processes.

    Quiet, offline defaults: no telemetry, no hub look-ups, no analytics database locks.
    """
    s = settings or get_settings()
    s.home.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_TRACKING_URI": s.tracking_uri,
        "BENTOML_HOME": str(s.bentoml_home.resolve()),
        "BENTOML_DO_NOT_TRACK": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # lockgate's own log lines go to the Prefect run logs (and so to the Prefect UI) too.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "lockgate",
        # Read by Prefect when it starts its temporary local API (no PREFECT_API_URL): its 20 s
        # default killed releases at start-up on a loaded 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(s.prefect_startup_timeout_s),
    }
    # Prefect keeps its database and results under the lockgate home unless told otherwise; it reads
    # this at import time, so callers export the environment before importing prefect.
    env["PREFECT_HOME"] = str((s.home / "prefect").resolve())
    if s.prefect_api_url:
        env["PREFECT_API_URL"] = s.prefect_api_url
    for key, value in env.items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in env}
