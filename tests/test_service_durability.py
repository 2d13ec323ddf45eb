"""A crash loses no acknowledged request-log row: a real service under traffic is killed with SIGKILL
(leader and workers, no shutdown hooks run), then every request a client got an answer for must be in
the SQLite request log (WAL mode, row committed before the response's last byte). No mocks."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import psutil

from lockgate.bentos.config import ServiceConfig
from lockgate.bentos.processes import kill_service_tree
from lockgate.bentos.request_log import RequestLog
from lockgate.tasks.release.serving import launch_service, wait_ready

CLIENTS = 4
KILL_AFTER_ANSWERS = 30


def _client(url: str, index: int, answered: list[str], stop: threading.Event) -> None:
    """Send requests until the server dies; keep the id of every request that got its full answer."""
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            try:
                resp = client.post("/generate", json={"prompt": f"Q: what is {index} plus {i}?\nA:"})
            except httpx.HTTPError:
                return  # the server is gone
            if resp.status_code == 200:
                answered.append(resp.json()["request_id"])
            i += 1


def test_answered_requests_survivekill_service_tree(tiny_llm_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "requests.db"
    config = ServiceConfig.model_validate(
        {"limits": {"max_new_tokens": 16}, "warmup_requests": 1, "batching": {"max_latency_ms": 5}}
    )
    service = launch_service(
        "lockgate.bentos.llm_service:LLMService",
        "stable",
        str(tiny_llm_dir),
        request_log=log_path,
        log_dir=tmp_path / "logs",
        config=config,
    )
    killed: list[int] = []
    try:
        wait_ready(service, 120)
        answered: list[str] = []
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client, args=(service.url, i, answered, stop), daemon=True)
            for i in range(CLIENTS)
        ]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 120
        while len(answered) < KILL_AFTER_ANSWERS and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = kill_service_tree(service.process.pid)  # mid-traffic: requests are in flight right now
        stop.set()
        for thread in clients:
            thread.join(35)
        service.process.wait(10)
    finally:
        service.stop()
    assert len(answered) >= KILL_AFTER_ANSWERS, service.log_tail()
    assert len(killed) >= 2, f"leader and worker expected, killed {killed}"
    assert not [pid for pid in killed if _alive(pid)], "a process survived"
    # The rows are still in the write-ahead log (no checkpoint ran at shutdown): reading recovers them.
    assert Path(f"{log_path}-wal").exists()
    with contextlib.closing(sqlite3.connect(log_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    frame = RequestLog(log_path).read_frame()
    logged = set(frame["request_id"])
    missing = [request_id for request_id in answered if request_id not in logged]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests lost: {missing[:5]}"
    assert set(frame.set_index("request_id").loc[answered, "status"]) == {"ok"}


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
