"""Where the routers' live request rows live, chosen by one setting (``LOCKGATE_LIVE_LOG_URL``).

* unset: one SQLite file per replica in the model's live folder (bentos/live_log.py) — replicas that
  share a disk (one machine);
* ``postgresql://...`` (or SQLAlchemy's ``postgresql+psycopg2://...``): one table every replica appends
  to (bentos/live_log_pg.py) — replicas on several hosts, e.g. the team stack's PostgreSQL.

Writers (the router) and readers (the release's live canary, `lockgate canary watch`, the analysis
endpoint) both go through :func:`open_live_store`, so they cannot disagree on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lockgate.bentos.live_log import LiveLog, LiveTail, LiveWriter, read_live_rows, replica_log_path
from lockgate.bentos.live_log_pg import PostgresLiveLog, PostgresLiveTail, libpq_url, read_pg_rows, redacted
from lockgate.bentos.rollout import LiveRow

LIVE_LOG_URL_VARIABLE = "LOCKGATE_LIVE_LOG_URL"


class LiveRowTail(Protocol):
    def read(self) -> list[LiveRow]:
        """The rows appended since the previous read (of every replica), oldest first."""
        ...


class LiveStore(Protocol):
    """One backend of the live request log: a writer per replica, reads over all replicas."""

    def describe(self) -> str: ...

    def writer(self, replica: str) -> LiveWriter: ...

    def read_rows(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        versions: tuple[str, ...] | None = None,
    ) -> list[LiveRow]: ...

    def tail(self, model: str, since: float) -> LiveRowTail: ...


@dataclass(frozen=True)
class SqliteLiveStore:
    """One SQLite file per replica in ``directory``."""

    directory: Path

    def describe(self) -> str:
        return f"per-replica SQLite files in {self.directory}"

    def writer(self, replica: str) -> LiveWriter:
        return LiveLog(replica_log_path(self.directory, replica))

    def read_rows(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        versions: tuple[str, ...] | None = None,
    ) -> list[LiveRow]:
        return read_live_rows(self.directory, model, since, until, versions)

    def tail(self, model: str, since: float) -> LiveRowTail:
        return LiveTail(self.directory, model, since)


@dataclass(frozen=True)
class PostgresLiveStore:
    """One table in the PostgreSQL database at ``url``, shared by every replica."""

    url: str

    def describe(self) -> str:
        return f"the shared PostgreSQL table at {redacted(self.url)}"

    def writer(self, replica: str) -> LiveWriter:
        replica_log_path(Path("."), replica)  # the same replica-id rule as the files
        return PostgresLiveLog(self.url)

    def read_rows(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        versions: tuple[str, ...] | None = None,
    ) -> list[LiveRow]:
        return read_pg_rows(self.url, model, since, until, versions)

    def tail(self, model: str, since: float) -> LiveRowTail:
        return PostgresLiveTail(self.url, model, since)


def check_live_log_url(url: str | None) -> str | None:
    """``url`` if it names a backend (unset/empty: the SQLite files); a clear error otherwise."""
    if not url:
        return None
    libpq_url(url)  # raises ValueError naming LOCKGATE_LIVE_LOG_URL
    return url


def open_live_store(url: str | None, directory: Path) -> LiveStore:
    """The backend ``LOCKGATE_LIVE_LOG_URL`` names: ``url`` set → the shared PostgreSQL table,
    unset → the per-replica SQLite files in ``directory``."""
    if check_live_log_url(url):
        return PostgresLiveStore(str(url))
    return SqliteLiveStore(Path(directory))
