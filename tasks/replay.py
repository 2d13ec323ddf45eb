"""Replayed traffic for the release strategies: users and prompts, pacing, one request as a client sees it.

Every request's outcome is measured on the client (what a user would experience): a transport error
or a non-2xx answer is a failed request of that version, never raised. The LLM signals of a
successful answer (generated tokens, an empty text, the server's time to first token where the
service reports it) come from the JSON body.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import httpx

from tasks.canary_analysis import Outcome, Target


@dataclass
class ReplayTraffic:
    """Replays prompts as users ``user-0 … user-{n-1}`` round-robin.

    With as many users as prompts (or a multiple) every user would always send the same prompt, and
    a canary holding some users would see only some prompts: choose co-prime counts in tests."""

    prompts: list[str]
    users: int
    _cycle: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts to replay")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")

    def next(self) -> tuple[str, str]:
        i = next(self._cycle)
        return f"user-{i % self.users}", self.prompts[i % len(self.prompts)]


@dataclass
class Pacer:
    """Sends at most ``rate_per_s`` requests per second (None: as fast as answers come back)."""

    rate_per_s: float | None
    _next_at: float = 0.0

    def wait(self) -> None:
        if self.rate_per_s is None:
            return
        now = time.monotonic()
        if self._next_at > now:
            time.sleep(self._next_at - now)
        self._next_at = max(now, self._next_at) + 1.0 / self.rate_per_s


@dataclass(frozen=True)
class Reply:
    """One request's outcome plus what the answer said (text and version, for shadow comparisons)."""

    outcome: Outcome
    text: str | None
    model_version: str | None


def call(
    client: httpx.Client,
    url: str,
    target: Target,
    prompt: str,
    user_id: str,
    max_new_tokens: int,
) -> Reply:
    """POST /generate once; failures become a failed :class:`Outcome`, never an exception."""
    started = time.perf_counter()
    body: dict | None = None
    try:
        response = client.post(
            f"{url}/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens, "user_id": user_id}
        )
        code = response.status_code
        if 200 <= code < 300:
            body = response.json()
    except httpx.TransportError:
        code = 0  # a dead or hung server is an error of that version, which is what we measure
    except ValueError:
        code = 0  # a 2xx without a JSON body is a broken answer, counted as a failure
    latency_ms = (time.perf_counter() - started) * 1000
    if body is None:
        return Reply(Outcome(target, False, latency_ms, code), None, None)
    text = body.get("text")
    tokens = body.get("output_tokens")
    ttft = body.get("time_to_first_token_ms")
    outcome = Outcome(
        target,
        True,
        latency_ms,
        code,
        output_tokens=int(tokens) if isinstance(tokens, int | float) else None,
        empty=not text.strip() if isinstance(text, str) else None,
        ttft_ms=float(ttft) if isinstance(ttft, int | float) else None,
    )
    version = body.get("model_version")
    return Reply(
        outcome, text if isinstance(text, str) else None, str(version) if version is not None else None
    )


def send(
    client: httpx.Client, url: str, target: Target, prompt: str, user_id: str, max_new_tokens: int
) -> Outcome:
    """One request's :class:`Outcome` (see :func:`call`)."""
    return call(client, url, target, prompt, user_id, max_new_tokens).outcome
