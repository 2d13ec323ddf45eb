"""Stopping ``lockgate serve`` (bentos.processes.run_service, which it runs the service with) with SIGTERM or
Ctrl-C stops the whole tree: BentoML's supervisor and its worker, which runs in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_service import REPO_ROOT, _free_port

from lockgate.bentos.config import ModelUri, ServiceConfig, ServiceEnv

LAUNCHER = """
import json, sys
from pathlib import Path
from lockgate.bentos.processes import run_service
command, env = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.exit(run_service(command, env, Path(sys.argv[3])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_whole_service_tree(tiny_llm_dir: Path, tmp_path: Path, signum: int) -> None:
    import json

    port = _free_port()
    service = ServiceEnv(
        model_uri=ModelUri.folder(tiny_llm_dir),
        config=ServiceConfig.model_validate({"warmup_requests": 1}),
    )
    env = service.process_env(os.environ)
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    command = [sys.executable, "-m", "bentoml", "serve", "lockgate.bentos.llm_service:LLMService"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, json.dumps(command), json.dumps(env), str(REPO_ROOT)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.err").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert launcher.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("service not ready in 90 s")
        tree = [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(tree) >= 2  # the supervisor and at least one worker
        launcher.send_signal(signum)
        assert launcher.wait(30) == 128 + signum
        alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert alive == [], f"still running after {signal.Signals(signum).name}: {alive}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/livez", timeout=2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
