"""A user-traffic generator for the production entry point: bounded users, a rate and a duration.

Tests and bench/bench_live_canary.py play the users with it. Each request is a real HTTP call to a
router replica (round-robin over ``urls``, so several replicas share the users), as a sticky user
(``user_id`` in the body) or, for ``anonymous_share`` of requests, with no id (routed by weight). What
each user got is recorded: status, which version and role answered (the router's headers), failover.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class UserRequest:
    """One request as its user experienced it."""

    sent_at: float
    user_id: str | None  # None: anonymous (routed by weight)
    url: str
    status_code: int  # 0: no HTTP answer at all
    version: str | None
    role: str | None
    failover: bool
    latency_ms: float

    @property
    def failed(self) -> bool:
        return not 200 <= self.status_code < 300


@dataclass
class UserTraffic:
    """Sends ``rate_per_s`` requests per second from ``users`` users until stopped or ``duration_s``."""

    urls: list[str]
    users: int = 200
    rate_per_s: float = 20.0
    anonymous_share: float = 0.0
    prompts: tuple[str, ...] = ("Q: what is 2 plus 3?\nA:", "Q: what is 7 plus 1?\nA:", "hello")
    max_new_tokens: int = 2
    concurrency: int = 16
    timeout_s: float = 30.0
    seed: int = 0
    records: list[UserRequest] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("urls: at least one router URL is needed")
        if self.users < 1 or self.rate_per_s <= 0 or not 0 <= self.anonymous_share <= 1:
            raise ValueError("users >= 1, rate_per_s > 0 and 0 <= anonymous_share <= 1 are required")

    def run(self, duration_s: float) -> list[UserRequest]:
        """Send for ``duration_s`` seconds (blocking); returns this run's records."""
        before = len(self.records)
        self._loop(time.monotonic() + duration_s)
        return self.records[before:]

    def start(self, duration_s: float = 3600.0) -> UserTraffic:
        """Send in the background until :meth:`stop` (or ``duration_s``)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(time.monotonic() + duration_s,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[UserRequest]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)
        return list(self.records)

    def since(self, started_at: float) -> list[UserRequest]:
        with self._lock:
            return [r for r in self.records if r.sent_at >= started_at]

    def _loop(self, deadline: float) -> None:
        rng = random.Random(self.seed)
        urls = itertools.cycle(self.urls)
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        with (
            httpx.Client(timeout=self.timeout_s, limits=limits) as client,
            ThreadPoolExecutor(self.concurrency) as pool,
        ):
            while not self._stop.is_set() and time.monotonic() < deadline:
                now = time.monotonic()
                if next_at > now:
                    time.sleep(next_at - now)
                next_at = max(next_at + interval, time.monotonic() - interval)  # no catch-up bursts
                user = None if rng.random() < self.anonymous_share else f"user-{rng.randrange(self.users)}"
                prompt = self.prompts[rng.randrange(len(self.prompts))]
                pool.submit(self._send, client, next(urls), user, prompt)

    def _send(self, client: httpx.Client, url: str, user: str | None, prompt: str) -> None:
        body: dict = {"prompt": prompt, "max_new_tokens": self.max_new_tokens}
        if user is not None:
            body["user_id"] = user
        sent = time.time()
        started = time.perf_counter()
        try:
            response = client.post(f"{url}/generate", json=body)
            code, headers = response.status_code, response.headers
        except httpx.HTTPError:
            code, headers = 0, httpx.Headers()
        record = UserRequest(
            sent,
            user,
            url,
            code,
            headers.get("x-lockgate-version"),
            headers.get("x-lockgate-role"),
            headers.get("x-lockgate-failover") == "1",
            (time.perf_counter() - started) * 1000,
        )
        with self._lock:
            self.records.append(record)
