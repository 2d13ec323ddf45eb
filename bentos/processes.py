"""Stopping a ``bentoml serve`` process tree: shared by the pipeline (tasks/serving.py), the tests and
the benchmarks. Standard library only, so it runs wherever the service runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def process_descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children before grandchildren (from /proc; Linux only)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


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
