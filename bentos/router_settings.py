"""The production router's settings, read from its environment: the one place their variable names
are spelled (``lockgate serve`` writes them with :meth:`RouterSettings.to_env`)."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lockgate.bentos.config import REGISTRY_POLL_VARIABLE
from lockgate.bentos.live_store import LIVE_LOG_URL_VARIABLE, LiveStore, check_live_log_url, open_live_store


class RouterSettings(BaseModel):
    """Every setting of the router, from its environment (the one place their names are spelled)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(..., min_length=1, description="LOCKGATE_ROUTER_MODEL: the registered model.")
    replica: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="LOCKGATE_ROUTER_REPLICA: names this replica's live log file and rows.",
    )
    live_log_dir: Path = Field(
        ...,
        description="LOCKGATE_LIVE_LOG_DIR: heartbeats, service logs, (no URL) a SQLite file per replica.",
    )
    live_log_url: str | None = Field(
        None,
        description=f"{LIVE_LOG_URL_VARIABLE}: postgresql://... puts every replica's live rows in one shared "
        "table (team mode); unset: the per-replica SQLite files (bentos/live_store.py).",
    )
    poll_s: float = Field(
        2.0, ge=0.05, le=3600, description="Registry poll interval (the services' variable, config.py)."
    )
    timeout_s: float = Field(60.0, gt=0, le=3600, description="LOCKGATE_ROUTER_TIMEOUT_S: per backend call.")
    backends: dict[str, str] | None = Field(
        None, description="LOCKGATE_ROUTER_BACKENDS: JSON {version: url}; unset: start services."
    )
    service_target: str = Field(
        "lockgate.bentos.llm_service:LLMService",
        description="LOCKGATE_ROUTER_SERVICE: what `bentoml serve` runs per version.",
    )
    service_python: str = Field(
        default_factory=lambda: sys.executable,
        description="LOCKGATE_ROUTER_SERVICE_PYTHON: the interpreter of spawned services (`lockgate serve` "
        "sets it with the release's choice, e.g. the serving environment's when vLLM may run).",
    )
    host: str = Field("127.0.0.1", description="LOCKGATE_HOST: where spawned services listen.")
    stop_grace_s: float = Field(
        30.0, ge=0, description="LOCKGATE_ROUTER_STOP_GRACE_S: keep an unneeded version's service."
    )

    @field_validator("live_log_url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
        return check_live_log_url(url)

    def live_store(self) -> LiveStore:
        """Where this router writes its live rows (the readers pick the same backend from the same URL)."""
        return open_live_store(self.live_log_url, self.live_log_dir)

    def to_env(self) -> dict[str, str]:
        """The variables that give a router process these settings (``from_env`` reads them back)."""
        env = {
            "LOCKGATE_ROUTER_MODEL": self.model,
            "LOCKGATE_ROUTER_REPLICA": self.replica,
            "LOCKGATE_LIVE_LOG_DIR": str(self.live_log_dir),
            REGISTRY_POLL_VARIABLE: str(self.poll_s),
            "LOCKGATE_ROUTER_TIMEOUT_S": str(self.timeout_s),
            "LOCKGATE_ROUTER_SERVICE": self.service_target,
            "LOCKGATE_ROUTER_SERVICE_PYTHON": self.service_python,
            "LOCKGATE_HOST": self.host,
            "LOCKGATE_ROUTER_STOP_GRACE_S": str(self.stop_grace_s),
        }
        if self.live_log_url:
            env[LIVE_LOG_URL_VARIABLE] = self.live_log_url
        if self.backends is not None:
            env["LOCKGATE_ROUTER_BACKENDS"] = json.dumps(self.backends)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterSettings:
        env = os.environ if env is None else env
        model = env.get("LOCKGATE_ROUTER_MODEL", "")
        home = Path(env.get("LOCKGATE_HOME", ".lockgate"))
        values: dict[str, Any] = {
            "model": model,
            "live_log_dir": env.get("LOCKGATE_LIVE_LOG_DIR") or home / "live" / model,
        }
        for key, name in (
            ("replica", "LOCKGATE_ROUTER_REPLICA"),
            ("poll_s", REGISTRY_POLL_VARIABLE),
            ("timeout_s", "LOCKGATE_ROUTER_TIMEOUT_S"),
            ("service_target", "LOCKGATE_ROUTER_SERVICE"),
            ("service_python", "LOCKGATE_ROUTER_SERVICE_PYTHON"),
            ("host", "LOCKGATE_HOST"),
            ("stop_grace_s", "LOCKGATE_ROUTER_STOP_GRACE_S"),
            ("live_log_url", LIVE_LOG_URL_VARIABLE),
        ):
            if env.get(name):
                values[key] = env[name]
        if env.get("LOCKGATE_ROUTER_BACKENDS"):
            try:
                values["backends"] = json.loads(env["LOCKGATE_ROUTER_BACKENDS"])
            except json.JSONDecodeError as exc:
                raise ValueError(f"LOCKGATE_ROUTER_BACKENDS is not JSON: {exc}") from exc
        return cls(**values)
