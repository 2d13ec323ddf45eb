"""One release per registered model at a time: a lease with an owner and an expiry, in a SQL table.

Why a table of its own and not registry tags: MLflow has no compare-and-set on tags, so two
releases writing ``lockgate.lock`` at once would both read their own value back (verify-after-write
only narrows the race). A primary key is atomic on every SQL database, so the protocol is:

* **acquire** — read the row; a live holder (unexpired, and its process alive when it runs on this
  host) means :class:`ReleaseLocked`, naming the owner. A stale row (expired, or its process is gone)
  is removed by *compare-and-delete* (``DELETE … WHERE model = ? AND token = <the stale token>``), then
  the new row is INSERTed: of two contenders exactly one INSERT succeeds, the other gets an
  ``IntegrityError`` and re-reads. Each statement is atomic by itself; no transaction spans them.
* **renew** — ``UPDATE … SET expires_at WHERE model = ? AND token = <mine>``; zero rows updated means
  the lease was lost (it expired and someone took over) and the release must stop before it touches
  the registry again (:class:`ReleaseLockLost`). The canary renews on every step and every 1/4 TTL.
* **release** — ``DELETE … WHERE model = ? AND token = <mine>``, also when the release fails.

Where the table lives (settings, ``LOCKGATE_LOCK_URL``): by default a SQLite file under
``LOCKGATE_HOME`` (next to the embedded MLflow store), which serialises writers with its own file
lock — right for runners on one host. With an MLflow tracking *server* and release runners on several
hosts, point ``LOCKGATE_LOCK_URL`` at a database all of them reach (e.g. the Postgres behind the
tracking server: ``postgresql://…/lockgate``); the same statements are atomic there. Never a SQLite
file on NFS: its locking is not reliable. The process-liveness shortcut only applies to holders on
the same host; a holder on another host is stale only once its lease expires.

The row also records the release's phase and the process groups of the services it started, so a
release that was killed can be recognised (``lockgate canary status``) and its orphaned services
stopped (:func:`tasks.release.serving.stop_orphaned_services`) by whoever recovers it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import psutil

from lockgate.tasks.platform.errors import LockgateError
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine, Table

log = get_logger(__name__)
TABLE = "lockgate_release_locks"
LockState = Literal["live", "expired", "dead"]


class ReleaseLocked(LockgateError):
    """Another release of the same registered model holds the lock."""

    def __init__(self, model: str, holder: LockInfo) -> None:
        self.model = model
        self.holder = holder
        remaining = holder.expires_at - time.time()
        super().__init__(
            f"{model}: a release is already running, owned by {holder.owner} "
            f"(pid {holder.pid} on {holder.host}, phase {holder.phase or 'starting'}, lease ends in "
            f"{max(remaining, 0):.0f}s); wait for it, or if it is gone run `lockgate canary recover {model}`"
        )


class ReleaseLockLost(LockgateError):
    """The lease expired and another release took the lock: this release must stop."""


@dataclass(frozen=True)
class LockRef:
    """The held lock as tasks receive it: a small, hashable value."""

    model: str
    token: str


@dataclass(frozen=True)
class LockInfo:
    model: str
    token: str
    owner: str
    host: str
    pid: int
    pid_started: str | None  # the process's start time: a recycled pid is not mistaken for the owner
    acquired_at: float
    expires_at: float
    phase: str
    services: tuple[int, ...]  # process groups of services the release started

    def state(self, now: float | None = None) -> LockState:
        """live, expired (lease ran out) or dead (its process on this host is gone)."""
        if (now if now is not None else time.time()) > self.expires_at:
            return "expired"
        if self.host == socket.gethostname() and not _process_matches(self.pid, self.pid_started):
            return "dead"
        return "live"


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (seconds since the epoch, 10 ms resolution), or None when it cannot be read."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _process_matches(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return started is None or _process_start(pid) in (None, started)


@lru_cache(maxsize=4)
def _table_for(url: str) -> tuple[Engine, Table]:
    from sqlalchemy import Column, Float, Integer, MetaData, String, Table, create_engine
    from sqlalchemy.exc import OperationalError

    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    engine = create_engine(url, **kwargs)
    metadata = MetaData()
    table = Table(
        TABLE,
        metadata,
        Column("model", String(256), primary_key=True),
        Column("token", String(64), nullable=False),
        Column("owner", String(500), nullable=False),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("pid_started", String(32)),
        Column("acquired_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
        Column("phase", String(500), nullable=False, default=""),
        Column("services", String(2000), nullable=False, default="[]"),
    )
    try:
        metadata.create_all(engine)
    except OperationalError:
        # Two processes creating the table at once: one loses with "already exists"; fine if it is there.
        from sqlalchemy import inspect

        if not inspect(engine).has_table(TABLE):
            raise
    return engine, table


def _table() -> tuple[Engine, Table]:
    url = get_settings().release_lock_url
    if url.startswith("sqlite:///"):
        get_settings().home.mkdir(parents=True, exist_ok=True)
    return _table_for(url)


def _info(row: object) -> LockInfo:
    m = row._mapping  # type: ignore[attr-defined]
    return LockInfo(
        model=m["model"],
        token=m["token"],
        owner=m["owner"],
        host=m["host"],
        pid=int(m["pid"]),
        pid_started=m["pid_started"],
        acquired_at=float(m["acquired_at"]),
        expires_at=float(m["expires_at"]),
        phase=m["phase"] or "",
        services=tuple(int(p) for p in json.loads(m["services"] or "[]")),
    )


def current(model: str) -> LockInfo | None:
    """The lock row of ``model`` (live or stale), or None."""
    from sqlalchemy import select

    engine, table = _table()
    with engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.model == model)).first()
    return _info(row) if row is not None else None


def all_locks() -> list[LockInfo]:
    from sqlalchemy import select

    engine, table = _table()
    with engine.connect() as conn:
        return [_info(r) for r in conn.execute(select(table).order_by(table.c.model))]


def check_free(model: str) -> LockInfo | None:
    """Raise :class:`ReleaseLocked` if a live release holds ``model``; return a stale row, if any.

    A cheap pre-check (the CLI runs it before starting Prefect); :func:`acquire` decides for real."""
    holder = current(model)
    if holder is not None and holder.state() == "live":
        raise ReleaseLocked(model, holder)
    return holder


def acquire(model: str, owner: str, ttl_s: float | None = None) -> tuple[LockRef, LockInfo | None]:
    """Take the lock of ``model``; returns it and the stale lock it replaced (to recover from), if any.

    Raises :class:`ReleaseLocked` naming the holder when a live release has it."""
    from sqlalchemy import delete, insert
    from sqlalchemy.exc import IntegrityError

    engine, table = _table()
    ttl = ttl_s if ttl_s is not None else get_settings().release_lock_ttl_s
    token = uuid.uuid4().hex
    replaced: LockInfo | None = None
    for _ in range(5):  # each retry follows another contender's successful insert or delete
        holder = check_free(model)
        if holder is not None:
            with engine.begin() as conn:  # compare-and-delete: only the stale row we looked at
                conn.execute(delete(table).where(table.c.model == model, table.c.token == holder.token))
            replaced = holder
        now = time.time()
        try:
            with engine.begin() as conn:
                conn.execute(
                    insert(table).values(
                        model=model,
                        token=token,
                        owner=owner[:500],
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        pid_started=_process_start(os.getpid()),
                        acquired_at=now,
                        expires_at=now + ttl,
                        phase="starting",
                        services="[]",
                    )
                )
        except IntegrityError:
            continue  # someone inserted first: re-read (live -> ReleaseLocked)
        if replaced is not None:
            log.warning(
                "%s: took over a %s release lock of %s (phase %s)",
                model,
                replaced.state(now),
                replaced.owner,
                replaced.phase,
            )
        log.info("%s: release lock taken by %s", model, owner)
        return LockRef(model, token), replaced
    holder = current(model)
    if holder is None:
        raise LockgateError(f"{model}: could not take the release lock after 5 attempts")
    raise ReleaseLocked(model, holder)


def renew(
    ref: LockRef,
    ttl_s: float | None = None,
    phase: str | None = None,
    services: list[int] | None = None,
) -> None:
    """Extend the lease (and record the phase / started services); raises :class:`ReleaseLockLost`."""
    from sqlalchemy import update

    engine, table = _table()
    ttl = ttl_s if ttl_s is not None else get_settings().release_lock_ttl_s
    values: dict[str, object] = {"expires_at": time.time() + ttl}
    if phase is not None:
        values["phase"] = phase[:500]
    if services is not None:
        values["services"] = json.dumps(services)
    with engine.begin() as conn:
        updated = conn.execute(
            update(table).where(table.c.model == ref.model, table.c.token == ref.token).values(**values)
        ).rowcount
    if updated != 1:
        raise ReleaseLockLost(
            f"{ref.model}: the release lock was lost (lease expired and taken over); stopping this release"
        )


def release(ref: LockRef) -> bool:
    """Give the lock back; False if it was no longer ours."""
    from sqlalchemy import delete

    engine, table = _table()
    with engine.begin() as conn:
        deleted = conn.execute(
            delete(table).where(table.c.model == ref.model, table.c.token == ref.token)
        ).rowcount
    if deleted:
        log.info("%s: release lock released", ref.model)
    return bool(deleted)


@contextmanager
def hold(model: str, owner: str, ttl_s: float | None = None) -> Iterator[tuple[LockRef, LockInfo | None]]:
    """``acquire`` … ``release``, the release also on failure.

    A daemon thread renews the lease every TTL/4 while the body runs (compression and evaluation can
    outlast a TTL); it dies with the process, so a killed release's lease still runs out."""
    ttl = ttl_s if ttl_s is not None else get_settings().release_lock_ttl_s
    ref, replaced = acquire(model, owner, ttl)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 4):
            try:
                renew(ref, ttl)
            except ReleaseLockLost:
                # The next renewal on the release's own path (each canary step) raises it there.
                log.error("%s: release lock lost; the release will stop at its next step", model)
                return
            except Exception:
                log.exception("%s: renewing the release lock failed; retrying in %.0fs", model, ttl / 4)

    thread = threading.Thread(target=beat, name="lockgate-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield ref, replaced
    finally:
        stop.set()
        thread.join(timeout=5)
        release(ref)


@dataclass
class Heartbeat:
    """Renews a lease at most every ``ttl_s / 4`` (and always when the phase changes)."""

    ref: LockRef | None
    ttl_s: float
    _last: float = 0.0
    _phase: str | None = None

    def __call__(self, phase: str | None = None, services: list[int] | None = None) -> None:
        if self.ref is None:
            return
        now = time.monotonic()
        changed = (phase is not None and phase != self._phase) or services is not None
        if not changed and now - self._last < self.ttl_s / 4:
            return
        renew(self.ref, self.ttl_s, phase, services)
        self._last, self._phase = now, phase if phase is not None else self._phase


def owner_label(trigger: str) -> str:
    """Who holds a lock, as error messages show it: user, host, pid and the trigger (flow run)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()} ({trigger})"
