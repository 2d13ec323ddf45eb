"""Screenshot the MLflow page of a release's parent run (its description tells the release's story).

Starts the MLflow UI over lockgate's store on a free loopback port, opens the run page in headless
Debian Chromium (``make chromium`` installs it) and writes a PNG, by default under
``reports/screenshots/`` (ignored by git). Usage::

    .venv/bin/python scripts/screenshot_mlflow_run.py [--run-id ID] [--out FILE.png]

Without ``--run-id`` it takes the newest release run (tag ``lockgate.pipeline``) of any experiment.
Exits non-zero with one line when there is no run, no Chromium, or the UI does not come up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

#: Flags the machine notes require: no sandbox as root, and no background connections (the network is
#: closed, and Chromium would otherwise retry Google's hosts at every start).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newest_release_run(tracking_uri: str) -> tuple[str, str]:
    """(experiment id, run id) of the newest run tagged as a release's parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string="tags.`lockgate.pipeline` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit("no release run in the MLflow store: run `lockgate run` first")
    return runs[0].info.experiment_id, runs[0].info.run_id


def _wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the MLflow UI did not answer at {url} within {timeout_s:.0f}s")


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int) -> Path:
    """Render ``url`` in headless Chromium and write a PNG to ``out``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: `make chromium` (Debian package chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lockgate-chromium-") as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            # The MLflow UI is a single-page app: give its scripts time to fetch and render the run.
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out.resolve()}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", help="The run to show; default: the newest release run.")
    parser.add_argument("--out", type=Path, help="PNG path; default: reports/screenshots/<run>.png.")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2200)
    parser.add_argument("--wait-ms", type=int, default=20_000, help="Render time Chromium grants the page.")
    args = parser.parse_args(argv)

    from lockgate.tasks.platform.settings import export_environment, get_settings

    export_environment()
    settings = get_settings()
    tracking_uri = settings.tracking_uri
    if args.run_id:
        from mlflow import MlflowClient

        run = MlflowClient(tracking_uri).get_run(args.run_id)
        experiment_id, run_id = run.info.experiment_id, run.info.run_id
    else:
        experiment_id, run_id = newest_release_run(tracking_uri)
    out = args.out or settings.reports_dir / "screenshots" / f"mlflow-run-{run_id}.png"

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if tracking_uri.startswith("sqlite:"):
        command += ["--default-artifact-root", settings.artifact_root]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/health", 120)
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        screenshot(url, out, args.width, args.height, args.wait_ms)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"{out}  ({url})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
