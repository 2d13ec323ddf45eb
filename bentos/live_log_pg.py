"""The live request log in one PostgreSQL table that every router replica shares (team mode).

Replicas on several hosts cannot read each other's SQLite files; they append to one table instead
(``LOCKGATE_LIVE_LOG_URL=postgresql://...``, e.g. the team stack's database), and the release flow reads
it. Same rows, same batching (:class:`~lockgate.bentos.live_log.BackgroundLiveLog` writes through
:class:`PostgresLiveLog`), same tail semantics as the per-replica files (:class:`PostgresLiveTail`).

Why per-replica cursors in the tail: ``id`` comes from a sequence at *insert* time, not commit time, so
two replicas' transactions can commit out of id order and one global "id > last" cursor would skip the
late one's rows. One replica's writer commits a batch before it inserts the next, so *its* ids are in
commit order; a cursor per replica reads each row once (two processes must not share a replica id —
the same rule as the SQLite files, where they would share a file).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import astuple
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from lockgate.bentos.live_log import live_row, row_filter
from lockgate.bentos.rollout import LIVE_COLUMNS, LiveRow

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection

TABLE = "live_requests"
_TYPES = {
    "ts": "DOUBLE PRECISION NOT NULL",
    "replica": "TEXT NOT NULL",
    "model_name": "TEXT NOT NULL",
    "sticky": "BOOLEAN",
    "arm_ok": "BOOLEAN",
    "status_code": "INTEGER",
    "latency_ms": "DOUBLE PRECISION",
    "total_ms": "DOUBLE PRECISION",
    "ttft_ms": "DOUBLE PRECISION",
    "output_tokens": "INTEGER",
    "empty": "BOOLEAN",
}
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGSERIAL PRIMARY KEY, "
    + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in LIVE_COLUMNS)
    + f"); CREATE INDEX IF NOT EXISTS {TABLE}_model_ts ON {TABLE} (model_name, ts)"
)
#: Serialises the first CREATE TABLE of replicas starting together (concurrent CREATE TABLE IF NOT
#: EXISTS can fail on the catalog's unique index).
_SCHEMA_LOCK = 0x6C6B6C6976  # "lkliv"
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def libpq_url(url: str) -> str:
    """``url`` as libpq takes it: SQLAlchemy's ``postgresql+psycopg2://`` (the team stack's one
    definition of its database URLs) becomes ``postgresql://``."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"LOCKGATE_LIVE_LOG_URL: {parts.scheme!r} is not a PostgreSQL URL ({_SCHEMES})")
    return urlunsplit(("postgresql", *parts[1:]))


def redacted(url: str) -> str:
    """``url`` without its password, for log messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _connect(url: str) -> Connection:
    import psycopg2  # the control plane's dependency; only team mode needs it

    return psycopg2.connect(libpq_url(url), connect_timeout=10)


def ensure_table(conn: Connection) -> None:
    """Create the table and its index if missing. Checked first: CREATE INDEX IF NOT EXISTS locks the
    table even when the index exists, so a replica (re)connecting would wait behind every other
    replica's open insert."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{TABLE}_model_ts",))
        if not cur.fetchone()[0]:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute(_SCHEMA)
    conn.commit()


class PostgresLiveLog:
    """One replica's writer into the shared table: a batch per transaction (the table is created,
    with its (model_name, ts) index, on first use)."""

    def __init__(self, url: str) -> None:
        libpq_url(url)  # a bad URL fails here, at start, not at the first request
        self.url = url
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    @property
    def where(self) -> str:
        return redacted(self.url)

    def append_many(self, rows: list[LiveRow]) -> None:
        from psycopg2.extras import execute_values

        with self._lock:
            try:
                conn = self._connection()
                with conn.cursor() as cur:
                    execute_values(
                        cur,
                        f"INSERT INTO {TABLE} ({', '.join(LIVE_COLUMNS)}) VALUES %s",
                        [astuple(row) for row in rows],
                        page_size=max(len(rows), 1),
                    )
                conn.commit()
            except Exception:
                self._drop()  # a server restart or a broken connection: reconnect on the next batch
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may raise; it is gone
                self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = _connect(self.url)
            try:
                ensure_table(conn)
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn


@contextlib.contextmanager
def _reading(url: str) -> Iterator[Any]:
    """A cursor on a fresh autocommit connection: each read sees every row committed before it."""
    conn = _connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def _table_exists(cur: Any) -> bool:
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
    return bool(cur.fetchone()[0])


def read_pg_rows(
    url: str,
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
    versions: tuple[str, ...] | None = None,
) -> list[LiveRow]:
    """Rows of every replica with ``since <= ts < until``, oldest first (as ``read_live_rows``)."""
    where, params = row_filter(model, since, until, versions, "%s")
    with _reading(url) as cur:
        if not _table_exists(cur):
            return []  # no replica has served anything yet
        cur.execute(f"SELECT {', '.join(LIVE_COLUMNS)} FROM {TABLE}{where} ORDER BY ts", params)
        return [live_row(values) for values in cur]


class PostgresLiveTail:
    """The rows every replica appended since the previous read (a cursor per replica, see the module
    docstring): a row a replica commits late, with an earlier ``ts`` than rows already read, is still
    read once."""

    def __init__(self, url: str, model: str, since: float) -> None:
        libpq_url(url)
        self.url = url
        self.model = model
        self.since = since
        self._cursors: dict[str, int] = {}

    def read(self) -> list[LiveRow]:
        columns = ", ".join(f"r.{c}" for c in LIVE_COLUMNS)
        replicas = sorted(self._cursors)
        with _reading(self.url) as cur:
            if not _table_exists(cur):
                return []
            cur.execute(
                f"SELECT r.id, {columns} FROM {TABLE} r "
                "LEFT JOIN unnest(%s::text[], %s::bigint[]) AS seen(replica, after) "
                "ON seen.replica = r.replica "
                "WHERE r.model_name = %s AND r.ts >= %s AND r.id > COALESCE(seen.after, 0) ORDER BY r.id",
                (replicas, [self._cursors[r] for r in replicas], self.model, self.since),
            )
            fetched = cur.fetchall()
        rows = []
        for row_id, *values in fetched:
            row = live_row(tuple(values))
            self._cursors[row.replica] = max(self._cursors.get(row.replica, 0), row_id)
            rows.append(row)
        rows.sort(key=lambda r: r.ts)
        return rows
