"""Durable log of live requests: one SQLite file per router replica, one row per request.

A replica writes only its own file (``<dir>/<replica>.db``), so replicas never contend for a lock; the
release flow reads every file in the folder (:func:`read_live_rows`), so a step's analysis counts the
requests of all replicas. Standard library only. This is the backend of replicas that share a disk;
replicas on several hosts share one PostgreSQL table instead (bentos/live_log_pg.py); one setting picks
(bentos/live_store.py ``open_live_store``). Both write through :class:`BackgroundLiveLog`.

Rows are written off the request path (:class:`BackgroundLiveLog`): the router queues a row when the
answer is ready and a writer thread commits whatever has queued in one transaction (group commit; WAL,
synchronous=NORMAL, so a committed row survives a crash of the router process). A commit per request
inside the event loop cost every request the commit and, at WAL checkpoints, an fsync — measured as
hundreds of ms at p99 (bench/bench_live_canary.py). The price: a router killed with SIGKILL loses the
rows of the last few milliseconds (the requests themselves were answered); a graceful stop flushes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import sqlite3
import threading
from dataclasses import astuple
from pathlib import Path
from typing import Protocol

from lockgate.bentos.request_log import open_log_database
from lockgate.bentos.rollout import LIVE_COLUMNS, LiveRow

_TYPES = {
    "ts": "REAL NOT NULL",
    "sticky": "INTEGER",
    "arm_ok": "INTEGER",
    "status_code": "INTEGER",
    "latency_ms": "REAL",
    "total_ms": "REAL",
    "ttft_ms": "REAL",
    "output_tokens": "INTEGER",
    "empty": "INTEGER",
}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS live_requests ("
    + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in LIVE_COLUMNS)
    + ");\nCREATE INDEX IF NOT EXISTS live_requests_ts ON live_requests (ts);"
)
log = logging.getLogger("lockgate.live_log")
_REPLICA = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class LiveWriter(Protocol):
    """What :class:`BackgroundLiveLog` writes through: one replica's rows, a batch per transaction."""

    @property
    def where(self) -> str:
        """Names the destination in log messages (never a password)."""
        ...

    def append_many(self, rows: list[LiveRow]) -> None: ...

    def close(self) -> None: ...


def replica_log_path(directory: Path, replica: str) -> Path:
    if not _REPLICA.match(replica):
        raise ValueError(f"replica id {replica!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return Path(directory) / f"{replica}.db"


class LiveLog:
    """The writer of one replica's file; appends from the router's event loop and threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    def append(self, row: LiveRow) -> None:
        """Insert ``row`` and commit it (durable once this returns)."""
        self.append_many([row])

    def append_many(self, rows: list[LiveRow]) -> None:
        """Insert ``rows`` in one transaction."""
        with self._lock:
            conn = self._connection()
            conn.executemany(
                f"INSERT INTO live_requests ({', '.join(LIVE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(LIVE_COLUMNS))})",
                [astuple(row) for row in rows],
            )
            conn.commit()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_log_database(self.path, _SCHEMA)
        return self._conn


class BackgroundLiveLog:
    """A :class:`LiveWriter` (a replica's SQLite file, or the shared PostgreSQL table) written by its
    own thread: ``put`` never blocks the caller on the database."""

    def __init__(self, log: LiveWriter | Path, max_batch: int = 500) -> None:
        self.log: LiveWriter = LiveLog(log) if isinstance(log, Path) else log
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[LiveRow | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lockgate-live-log", daemon=True)
        self._thread.start()
        self.error: BaseException | None = None

    def put(self, row: LiveRow) -> None:
        self._queue.put(row)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            stop = first is None
            while not stop and len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                try:
                    self.log.append_many(batch)
                # Any backend's error (sqlite3, psycopg2): logged now, re-raised by close(), never lost.
                except Exception as exc:
                    self.error = self.error or exc
                    log.error("live log %s: %d row(s) not written: %s", self.log.where, len(batch), exc)
            if stop:
                return

    def close(self, timeout_s: float = 10) -> None:
        """Flush what is queued, stop the writer; raises the first write error, if any."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        self.log.close()
        if self.error is not None:
            raise self.error


def live_row(values: tuple) -> LiveRow:
    """A row read back from either backend (booleans stored as integers in SQLite)."""
    row = dict(zip(LIVE_COLUMNS, values, strict=True))
    for flag in ("sticky", "arm_ok", "empty"):
        if row[flag] is not None:
            row[flag] = bool(row[flag])
    return LiveRow(**row)


def row_filter(
    model: str | None,
    since: float | None,
    until: float | None,
    versions: tuple[str, ...] | None,
    mark: str,
) -> tuple[str, list]:
    """The WHERE clause (with its parameters) of a live-row read, in the driver's placeholder ``mark``
    (sqlite3 ``?``, psycopg2 ``%s``): every backend filters alike."""
    clauses, params = [], []
    for column, op, value in (("model_name", "=", model), ("ts", ">=", since), ("ts", "<", until)):
        if value is not None:
            clauses.append(f"{column} {op} {mark}")
            params.append(value)
    if versions:
        clauses.append(f"version IN ({', '.join([mark] * len(versions))})")
        params.extend(versions)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def read_live_rows(
    directory: Path,
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
    versions: tuple[str, ...] | None = None,
) -> list[LiveRow]:
    """Rows of every replica's file in ``directory`` with ``since <= ts < until``, oldest first."""
    where, params = row_filter(model, since, until, versions, "?")
    rows: list[LiveRow] = []
    for path in sorted(Path(directory).glob("*.db")):
        # Read-only and one connection per read: readers never block a replica's writer under WAL.
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)) as conn:
            try:
                cursor = conn.execute(f"SELECT {', '.join(LIVE_COLUMNS)} FROM live_requests{where}", params)
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    continue  # a replica that has served nothing yet
                raise
            rows.extend(live_row(values) for values in cursor)
    rows.sort(key=lambda r: r.ts)
    return rows


class LiveTail:
    """Reads the rows every replica appended since the previous read (per-file rowid cursors): a row
    a replica commits late, with an earlier ``ts`` than rows already read, is still read once."""

    def __init__(self, directory: Path, model: str, since: float) -> None:
        self.directory = Path(directory)
        self.model = model
        self.since = since
        self._cursors: dict[Path, int | None] = {}

    def read(self) -> list[LiveRow]:
        rows: list[LiveRow] = []
        columns = ", ".join(LIVE_COLUMNS)
        for path in sorted(self.directory.glob("*.db")):
            after = self._cursors.get(path)
            uri = f"file:{path}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
                try:
                    if after is None:  # first read: start at the window, not at the file's first row
                        older = "SELECT COALESCE(MAX(rowid), 0) FROM live_requests WHERE ts < ?"
                        after = int(conn.execute(older, (self.since,)).fetchone()[0])
                    cursor = conn.execute(
                        f"SELECT rowid, {columns} FROM live_requests "
                        "WHERE rowid > ? AND model_name = ? AND ts >= ? ORDER BY rowid",
                        (after, self.model, self.since),
                    )
                except sqlite3.OperationalError as exc:
                    if "no such table" in str(exc):
                        continue  # a replica that has served nothing yet
                    raise
                for rowid, *values in cursor:
                    after = rowid
                    rows.append(live_row(tuple(values)))
            self._cursors[path] = after
        rows.sort(key=lambda r: r.ts)
        return rows
