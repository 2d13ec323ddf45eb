"""What a release strategy is given, and the services it releases with.

Every strategy (tasks/release/canary_strategy.py, blue_green.py, shadow.py) is one module with one
entry point of one signature, ``release(run: ReleaseRun) -> CanaryResult``; the canary stage
(tasks/canary.py) picks it from a table by ``canary.strategy``. A strategy starts its services from
:attr:`ReleaseRun.launch` with :func:`serve`, which stops them whatever happens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.bentos.config import ServiceConfig
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.release.lock import Heartbeat
from lockgate.tasks.release.outcome import CanaryResult
from lockgate.tasks.release.serving import ServiceProcess, launch_service, service_engine, wait_ready
from lockgate.tasks.release.state import CanaryState

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec

log = get_logger(__name__)

#: Roles of the candidate's own services: one that cannot start is the candidate's failure.
CANDIDATE_ROLES = ("canary", "green")


@dataclass(frozen=True)
class ReleaseRun:
    """One release of a staged candidate, as every strategy receives it."""

    state: CanaryState  # versions, bento, prompts, paths, and a canary's checkpoint to resume from
    spec: CanarySpec
    trigger: str  # who started the release (registry transitions record it)
    heartbeat: Heartbeat  # renews the release lock and records the services' process groups
    #: role -> the engine its service runs and why (from its /capacity), for the release summary.
    engines: dict[str, str] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return list(self.state.prompts)

    @property
    def launch(self) -> dict[str, object]:
        """:func:`~lockgate.tasks.release.serving.launch_service` arguments every service shares."""
        # Two services share this machine: split its cores between them.
        threads = max(1, (os.cpu_count() or 2) // 2)
        config = self.state.service_config
        return {
            "target": self.state.bento_tag,
            "request_log": Path(self.state.request_log),
            "log_dir": Path(self.state.log_dir),
            "torch_threads": threads,
            # The pipeline's package: settings (a locally served bento does not apply its baked envs).
            "config": ServiceConfig.model_validate_json(config) if config else None,
        }

    @property
    def report_dir(self) -> Path:
        """Where a strategy writes its report (the release's reports folder, else next to the logs)."""
        if self.state.report_dir:
            return Path(self.state.report_dir)
        return Path(self.state.log_dir) / self.spec.strategy


Strategy = Callable[[ReleaseRun], CanaryResult]
"""A strategy's entry point: run the release, return the decision (and apply it where it says so)."""


def start_release_services(
    launches: list[dict], ready_timeout_s: float = 180
) -> tuple[list[ServiceProcess], str | None]:
    """Launch every service at once (start-ups overlap), then wait for each to be ready.

    A candidate service that never becomes ready (its model does not load, it crashes in warm-up) is
    the candidate failing — like a canary whose pods never get ready in Argo — and is returned as a
    rollback reason with the stable services still running; any other failure stops all and raises."""
    services = [launch_service(**kwargs) for kwargs in launches]
    try:
        for service in services:
            try:
                wait_ready(service, ready_timeout_s)
            except StageFailed as exc:
                if service.role not in CANDIDATE_ROLES:
                    raise
                log.warning("candidate service failed to start: %s", exc)
                service.stop()
                return [s for s in services if s is not service], f"candidate service failed to start: {exc}"
            log.info("%s service ready at %s", service.role, service.url)
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services, None


@contextlib.contextmanager
def serve(run: ReleaseRun, launches: list[dict]) -> Iterator[tuple[list[ServiceProcess], str | None]]:
    """Start ``launches`` (see :func:`start_release_services`), record them in the release lock, and
    stop them on the way out whatever happens."""
    services, failed = start_release_services(launches)
    try:
        run.heartbeat(f"{run.spec.strategy}: services started", [s.process.pid for s in services])
        for service in services:
            run.engines[service.role] = service_engine(service)
        yield services, failed
    finally:
        for service in services:
            service.stop()
