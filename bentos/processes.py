"""Stopping a ``bentoml serve`` process tree: shared by the pipeline (tasks/release/serving.py), the tests and
the benchmarks. The standard library and psutil (a dependency of bentoml itself), so it runs wherever the
service runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil


def process_descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (none when ``pid`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_service_tree(leader: int) -> list[int]:
    """SIGKILL a ``bentoml serve`` and everything it started; returns the pids killed.

    Its worker runs in a session of its own (circus calls setsid): killing the leader's process
    group alone leaves the worker serving. So the workers are found first, then the leader dies
    first (nothing respawns them), then each worker."""
    tree = process_descendants(leader)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [leader, *tree]


def stop_service(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the service's process group (a graceful stop: running requests finish, the request log
    closes); after ``timeout_s`` SIGKILL the whole tree, the worker in its own session included."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_service_tree(process.pid)
        process.wait(5)


def run_service(command: Sequence[str], env: Mapping[str, str], cwd: Path, timeout_s: float = 15) -> int:
    """Run ``bentoml serve`` in the foreground until it exits or this process gets SIGTERM/SIGINT (Ctrl-C);
    then stop its whole tree (:func:`stop_service`: the worker runs in a session of its own, so a signal
    to this process alone never reaches it). Returns the service's exit code."""
    process = subprocess.Popen(list(command), env=dict(env), cwd=cwd, start_new_session=True)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while process.poll() is None and not stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.2)
    finally:
        tree = process_descendants(process.pid)  # found before the supervisor goes
        stop_service(process, timeout_s)
        for pid in tree:  # a worker that outlived its supervisor
            with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                psutil.Process(pid).wait(timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stopping[0] if stopping else (process.returncode or 0)
