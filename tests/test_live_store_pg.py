"""The live request log shared by every router replica in team mode: one PostgreSQL table
(bentos/live_log_pg.py), chosen by LOCKGATE_LIVE_LOG_URL (bentos/live_store.py).

Against a real PostgreSQL server: a throwaway cluster started with the team stack's own code, its URL
as `lockgate up` exports it. Skipped, saying why, where no server binaries are installed
(`make postgres`)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

import live_support
from conftest import run_cli
from live_support import live_model, running_step
from lockgate.bentos.live_log import BackgroundLiveLog
from lockgate.bentos.live_log_pg import TABLE, libpq_url
from lockgate.bentos.live_store import PostgresLiveStore, SqliteLiveStore, open_live_store
from lockgate.bentos.rollout import (
    LIVE_COLUMNS,
    LiveRow,
)
from lockgate.bentos.router_settings import RouterSettings
from lockgate.tasks.platform.settings import Settings
from lockgate.tasks.release.live import live_dir

team_live_url = live_support.team_live_url  # the module-scoped PostgreSQL fixture


def _row(model: str, replica: str, version: str, role: str, ok: bool, ts: float) -> LiveRow:
    return LiveRow(
        ts=ts,
        request_id=uuid.uuid4().hex,
        replica=replica,
        model_name=model,
        version=version,
        role=role,  # type: ignore[arg-type]
        sticky=role == "canary",
        user_hash="u1" if role == "canary" else None,
        outcome="ok" if ok else "failover",
        arm_ok=ok,
        status_code=200 if ok else 500,
        latency_ms=12.5,
        total_ms=13.25,
        answered_version=version if ok else "1",
        ttft_ms=None if ok else 3.0,
        output_tokens=4 if ok else None,
        empty=False if ok else None,
        error=None if ok else "HTTP 500",
    )


def test_two_replicas_share_one_table_and_the_tail_reads_each_row_once(
    team_live_url: str, tmp_path: Path
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    store = open_live_store(team_live_url, tmp_path)
    assert isinstance(store, PostgresLiveStore) and "***" in store.describe()
    now = time.time()
    tail = store.tail(model, since=now - 60)
    assert tail.read() == []  # nothing written yet (the table may not even exist)

    # Two replicas, each through the router's batching writer, into the one table.
    written: list[LiveRow] = []
    writers = {replica: BackgroundLiveLog(store.writer(replica)) for replica in ("r0", "r1")}
    for i in range(3):
        for replica, writer in writers.items():
            row = _row(model, replica, "2" if i else "1", "canary" if i else "stable", i != 2, now - 10 + i)
            writer.put(row)
            written.append(row)
    for writer in writers.values():
        writer.close()  # flushes
    first = tail.read()
    assert sorted(first, key=lambda r: r.request_id) == sorted(written, key=lambda r: r.request_id)
    assert [r.ts for r in first] == sorted(r.ts for r in first)
    assert tail.read() == []  # incremental: nothing new, nothing again

    # A restarted replica keeps appending; the tail reads only the new rows.
    again = BackgroundLiveLog(store.writer("r0"))
    fresh = [_row(model, "r0", "2", "canary", True, now - 1), _row(model, "r0", "1", "stable", True, now)]
    for row in fresh:
        again.put(row)
    again.close()
    assert tail.read() == fresh

    # A late commit: replica r0's insert takes its id first but commits after r1's (a higher id, read
    # already). A single "id > last" cursor would skip it; the per-replica cursor reads it, once.
    late = _row(model, "r0", "2", "canary", False, now - 5)
    slow = psycopg2.connect(libpq_url(team_live_url))
    try:
        with slow.cursor() as cur:
            cur.execute(
                f"INSERT INTO {TABLE} ({', '.join(LIVE_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(LIVE_COLUMNS))})",
                [getattr(late, c) for c in LIVE_COLUMNS],
            )
        quick = store.writer("r1")
        quick_row = _row(model, "r1", "1", "stable", True, now + 1)
        quick.append_many([quick_row])
        quick.close()
        assert tail.read() == [quick_row]
        slow.commit()
    finally:
        slow.close()
    assert tail.read() == [late]
    assert tail.read() == []

    # Whole-window reads (the analysis endpoint's): every replica, filters, oldest first.
    everything = store.read_rows(model)
    assert len(everything) == len(written) + len(fresh) + 2
    assert {r.replica for r in everything} == {"r0", "r1"}
    assert [r.ts for r in everything] == sorted(r.ts for r in everything)
    assert len(store.read_rows(model, versions=("1",))) == sum(r.version == "1" for r in everything)
    assert store.read_rows(model, since=now, until=now + 0.5) == [fresh[1]]
    assert store.read_rows(f"{model}-other") == []

    with psycopg2.connect(libpq_url(team_live_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (TABLE,))
        assert any("(model_name, ts)" in d for (d,) in cur.fetchall()), "indexed on (model_name, ts)"


def test_canary_watch_counts_both_replicas_arms_from_the_shared_store(
    team_live_url: str, tiny_llm_dir: Path, tracking: str
) -> None:
    name, _ = live_model(tiny_llm_dir)
    started = time.time() - 1
    running_step(name, started)
    store = open_live_store(team_live_url, live_dir(name))
    for replica in ("a", "b"):
        writer = BackgroundLiveLog(store.writer(replica))
        writer.put(_row(name, replica, "1", "stable", True, started - 30))  # before the step: not counted
        for ok in (True, True, False):
            writer.put(_row(name, replica, "2", "canary", ok, time.time()))
        writer.put(_row(name, replica, "1", "stable", True, time.time()))
        writer.close()
    env = {**os.environ, "LOCKGATE_LIVE_LOG_URL": team_live_url}
    watched = run_cli("canary", "watch", name, "--once", "--json", env=env)
    assert watched.returncode == 0, watched.stderr
    arms = json.loads(watched.stdout)["arms"]
    assert (arms["canary"]["requests"], arms["canary"]["errors"], arms["canary"]["failovers"]) == (6, 2, 2)
    assert arms["stable"]["requests"] == 2 and arms["stable"]["version"] == "1"
    assert not list(live_dir(name).glob("*.db")), "team mode writes no per-replica files"
    # Without the URL the same command reads this machine's (empty) per-replica files.
    local = run_cli("canary", "watch", name, "--once", "--json", env={**os.environ})
    assert json.loads(local.stdout)["arms"]["canary"]["requests"] == 0


def test_one_setting_names_the_backend_for_router_and_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql+psycopg2://lockgate:pw@127.0.0.1:5999/lockgate"
    router = RouterSettings(model="m", live_log_dir=tmp_path, live_log_url=url)
    env = router.to_env()
    assert RouterSettings.from_env(env) == router
    # lockgate serve hands the router what the tasks' settings read from the same variable.
    monkeypatch.setenv("LOCKGATE_LIVE_LOG_URL", env["LOCKGATE_LIVE_LOG_URL"])
    assert Settings().live_log_url == url
    assert isinstance(router.live_store(), PostgresLiveStore)
    assert libpq_url(url) == "postgresql://lockgate:pw@127.0.0.1:5999/lockgate"
    plain = RouterSettings(model="m", live_log_dir=tmp_path)
    assert "LOCKGATE_LIVE_LOG_URL" not in plain.to_env()
    assert plain.live_store() == SqliteLiveStore(tmp_path)
    with pytest.raises(ValueError, match="LOCKGATE_LIVE_LOG_URL: 'mysql' is not a PostgreSQL URL"):
        RouterSettings(model="m", live_log_dir=tmp_path, live_log_url="mysql://x/y")
