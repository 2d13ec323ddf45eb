"""Start-up of Prefect's temporary local API: a longer timeout than Prefect's 20 s, a retry, a clear error.

Each case runs in a fresh interpreter: Prefect reads its settings when it is imported, and the test
session has imported it already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, os
from lockgate.tasks.platform.settings import export_environment
export_environment()
from lockgate.tasks.platform.errors import LockgateError
from lockgate.tasks.platform.local_api import start_local_api
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
out = {"timeout": PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()}
if os.environ.get("PROBE_START"):
    try:
        url = start_local_api()
        import httpx
        out["url"] = url
        out["health"] = httpx.get(url + "/health", timeout=10).status_code
    except LockgateError as exc:
        out["error"] = str(exc)
print(json.dumps(out))
"""


def _probe(tmp_path: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LOCKGATE_PREFECT"))}
    clean.update(LOCKGATE_HOME=str(tmp_path / "home"), **env)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=clean, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_release_environment_gives_prefect_a_longer_startup_timeout(tmp_path: Path) -> None:
    assert _probe(tmp_path)["timeout"] == 120  # Prefect's own default is 20 s
    assert _probe(tmp_path, LOCKGATE_PREFECT_STARTUP_TIMEOUT_S="300")["timeout"] == 300
    # A value the user set for Prefect itself wins.
    assert _probe(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45")["timeout"] == 45


def test_local_api_starts_and_answers(tmp_path: Path) -> None:
    out = _probe(tmp_path, PROBE_START="1")
    assert out.get("error") is None
    assert out["url"].startswith("http://127.0.0.1:")
    assert out["health"] == 200


def test_a_startup_that_times_out_is_retried_then_named(tmp_path: Path) -> None:
    # A 0 s budget makes every attempt time out for real (Prefect waits no time for the health check).
    out = _probe(
        tmp_path,
        PROBE_START="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
        LOCKGATE_PREFECT_STARTUP_ATTEMPTS="3",
    )
    assert "url" not in out
    assert "did not start within 0s, 3 attempt(s)" in out["error"]
    assert "LOCKGATE_PREFECT_STARTUP_TIMEOUT_S" in out["error"]
