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

from lockgate.tasks.release.analysis import Outcome, Target


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


@dataclass
class ClientCounts:
    """Replayed user requests as their users experienced them (mirrored copies are not counted)."""

    requests: int = 0
    failed: int = 0  # the user got no answer: the request failed on every version tried
    failovers: int = 0  # canary requests the canary could not answer, answered by stable instead


class FailoverRouter:
    """The canary's user-facing router: each request goes to its routed version; when the canary cannot
    answer it (connection refused or dropped mid-request, a timeout, a 5xx), the same request is sent
    to stable and the user gets stable's answer — as Envoy's retry policy does behind Argo Rollouts.

    Generation requests are safe to send twice (nothing is written). The analysis still sees the
    canary's own failed outcome (what :meth:`send` returns), so failing over hides a bad canary from
    users, never from the verdict. A transport failure is followed by one ``/livez`` probe; when that
    gets no answer either, the candidate is marked dead (:attr:`dead`) and the canary stops."""

    def __init__(self, client: httpx.Client, stable_url: str, canary_url: str, max_new_tokens: int) -> None:
        self.client = client
        self.urls: dict[Target, str] = {"stable": stable_url, "canary": canary_url}
        self.max_new_tokens = max_new_tokens
        self.counts = ClientCounts()
        self.dead: str | None = None  # why the candidate is considered dead, once it is

    def _call(self, target: Target, prompt: str, user_id: str) -> Outcome:
        return call(self.client, self.urls[target], target, prompt, user_id, self.max_new_tokens).outcome

    def send(self, target: Target, prompt: str, user_id: str) -> Outcome:
        """One user request; returns the routed version's own outcome (for the analysis)."""
        self.counts.requests += 1
        outcome = self._call(target, prompt, user_id)
        if outcome.ok:
            return outcome
        if target == "canary":
            self.counts.failovers += 1
            answered = self._call("stable", prompt, user_id).ok
            if outcome.status_code == 0 and self.dead is None:
                self._probe_canary()
        else:
            answered = False  # stable is the fallback: nothing behind it
        self.counts.failed += int(not answered)
        return outcome

    def mirror(self, target: Target, prompt: str, user_id: str) -> Outcome:
        """A copy no user waits for (the 100 % step's stable baseline): neither counted nor retried."""
        return self._call(target, prompt, user_id)

    def _probe_canary(self) -> None:
        try:
            self.client.get(f"{self.urls['canary']}/livez", timeout=2.0)
        except httpx.TransportError as exc:
            self.dead = f"candidate service at {self.urls['canary']} does not answer ({type(exc).__name__})"

    def health(self) -> str | None:
        """None while the candidate is believed alive, else why it is dead."""
        return self.dead
