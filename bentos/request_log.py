"""Append-only SQLite log of served requests: written by the LLM service, read by the monitor stage.

One row per request, committed before the response's last byte is sent, so an acknowledged request is
never missing. WAL mode lets readers (``read_frame``) run while the service writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd

Status = Literal["ok", "error", "rejected"]

# Column order == RequestRow field order. ``endpoint`` is extra to the list: the monitor needs
# to tell streamed from unary requests (their latency means different things).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    service_role TEXT,
    model_name TEXT,
    model_version TEXT,
    endpoint TEXT,
    user_hash TEXT,
    prompt_chars INTEGER,
    prompt_tokens INTEGER,
    output_tokens INTEGER,
    latency_ms REAL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error', 'rejected')),
    error TEXT,
    prompt TEXT,
    output TEXT,
    confidence REAL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
"""


@dataclass(frozen=True)
class RequestRow:
    """One served (or refused) request. ``prompt``/``output`` stay None unless raw-text logging is on."""

    ts: float
    request_id: str
    service_role: str | None
    model_name: str | None
    model_version: str | None
    endpoint: str | None
    user_hash: str | None
    prompt_chars: int | None
    prompt_tokens: int | None
    output_tokens: int | None
    latency_ms: float | None
    status: Status
    error: str | None = None
    prompt: str | None = None
    output: str | None = None
    confidence: float | None = None


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RequestRow))


def hash_user(user_id: str | None) -> str | None:
    """Pseudonymous user key: first 16 hex chars of sha256(user_id), None when there is no user."""
    if user_id is None:
        return None
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def open_log_database(path: Path, schema: str) -> sqlite3.Connection:
    """A writer connection to an append-only log database (``schema`` applied), WAL mode.

    check_same_thread=False: writers append from an event loop and worker threads, serialised by the
    caller's lock. synchronous=NORMAL in WAL mode: a commit survives a process crash (not an OS crash)
    without an fsync per row; the fsync happens at checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


class RequestLog:
    """The ``requests`` table of one SQLite file. Writers share one connection per instance."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def append(self, row: RequestRow) -> None:
        """Insert ``row`` and commit it (durable once this returns)."""
        with self._lock:
            conn = self._connection()
            conn.execute(
                f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                astuple(row),
            )
            conn.commit()

    def read_frame(self, since: float | None = None) -> pd.DataFrame:
        """Rows with ``ts >= since`` (all when None), oldest first; raises if the log does not exist."""
        import pandas as pd

        if not self.path.is_file():
            raise FileNotFoundError(f"request log {self.path} does not exist")
        # A fresh read-only connection per call: readers never block the writer under WAL.
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as conn:
            # A log written before a column was added lacks it until a writer opens it: read NULLs.
            present = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
            selected = ", ".join(c if c in present else f"NULL AS {c}" for c in COLUMNS)
            query = f"SELECT {selected} FROM requests"
            if since is None:
                return pd.read_sql_query(query + " ORDER BY ts", conn)
            return pd.read_sql_query(query + " WHERE ts >= ? ORDER BY ts", conn, params=(since,))

    def close(self) -> None:
        """Close the writer connection (a later ``append`` reopens it)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = open_log_database(self.path, _SCHEMA)
            # Logs written before the confidence column existed get it added (NULL for old rows).
            present = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
            for column in ("confidence",):
                if column not in present:
                    conn.execute(f"ALTER TABLE requests ADD COLUMN {column} REAL")
            self._conn = conn
        return self._conn
