"""Start Prefect's temporary local API up front, tolerating a loaded machine.

Without ``PREFECT_API_URL`` Prefect starts a local API server in a subprocess the first time a flow
needs it and gives up after ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``. Under load (a 2-core
machine shared with other jobs) that start-up can take longer than Prefect's 20 s default, and the
release then dies before its first stage with a bare ``RuntimeError``. Starting it here — with the
longer timeout of :class:`Settings` exported, a retry, and an error that says what to change — makes
the failure rare and, when it happens, actionable. Prefect keeps one server per process, so the flow
that runs next reuses this one.
"""

from __future__ import annotations

import os

from lockgate.tasks.platform.errors import LockgateError
from lockgate.tasks.platform.log import get_logger

log = get_logger(__name__)


class LocalApiError(LockgateError):
    """Prefect's temporary local API did not start."""


def start_local_api(attempts: int | None = None) -> str | None:
    """Start Prefect's temporary local API unless ``PREFECT_API_URL`` names a server; return its URL.

    Call after :func:`export_environment` (Prefect reads its settings at import time). Retries a
    start-up that timed out; raises :class:`LocalApiError` naming the timeout and the settings to
    raise (or the server to use) when every attempt failed.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from lockgate.tasks.platform.settings import get_settings

    tries = attempts or get_settings().prefect_startup_attempts
    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    last: Exception | None = None
    for attempt in range(1, tries + 1):
        server = SubprocessASGIServer()
        try:
            server.start()
        except RuntimeError as exc:  # Prefect's timeout (its message carries the server's output)
            last = exc
            server.stop()  # the slow server process would otherwise linger next to the retry
            log.warning(
                "Prefect's local API did not start in %ss (attempt %d of %d)", timeout, attempt, tries
            )
            continue
        return server.api_url
    raise LocalApiError(
        f"Prefect's temporary local API did not start within {timeout}s, {tries} attempt(s): the "
        "machine is probably overloaded. Raise LOCKGATE_PREFECT_STARTUP_TIMEOUT_S (or "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) or LOCKGATE_PREFECT_STARTUP_ATTEMPTS, or "
        f"point LOCKGATE_PREFECT_API_URL at a running server (`lockgate up`). Last error: {last}"
    )
