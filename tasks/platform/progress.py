"""Progress in the terminal: "stage k/n: name" headers and a heartbeat during long steps.

A release has steps that run for a minute without a word (distillation, sensitivity, evaluation,
service start-up): a heartbeat line every ``HEARTBEAT_S`` says what is still running and for how long,
so a silent terminal always means a hung process, never a busy one. A heartbeat opened inside another
in the same thread (a canary step inside the canary stage) speaks for both while it runs: one line per
beat, the innermost, most specific one, e.g. the requests per arm of the current canary step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lockgate.tasks.platform.log import get_logger

log = get_logger(__name__)

HEARTBEAT_S = 10.0

# The heartbeats open in each thread, outermost first: only the innermost one of a thread beats.
_open: dict[int, list[object]] = {}
_open_lock = threading.Lock()


def stage_header(index: int, total: int, name: str, detail: str = "") -> None:
    """Log ``stage k/n: name`` (with what it works on) as a stage starts."""
    log.info("stage %d/%d: %s%s", index, total, name, f" ({detail})" if detail else "")


def arm_requests(canary: int, stable: int) -> str:
    """How much traffic each arm of a canary step has had so far, as the heartbeat says it."""
    return f"canary {canary} req / stable {stable} req"


@contextmanager
def heartbeat(what: str | Callable[[], str], every_s: float | None = None) -> Iterator[None]:
    """Log "still <what> (N s)" every ``every_s`` (default ``HEARTBEAT_S``) seconds until the block ends
    (a daemon thread).

    ``what`` may be a callable, asked at every beat (a step's running counts). While a heartbeat opened
    later in the same thread is open, this one stays silent."""
    describe = what if callable(what) else (lambda: what)
    owner, token = threading.get_ident(), object()
    with _open_lock:
        _open.setdefault(owner, []).append(token)
    interval = HEARTBEAT_S if every_s is None else every_s
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            with _open_lock:
                innermost = _open[owner][-1] is token
            if innermost:
                log.info("… still %s (%.0f s)", describe(), time.monotonic() - started)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)
        with _open_lock:
            _open[owner].remove(token)
            if not _open[owner]:
                del _open[owner]
