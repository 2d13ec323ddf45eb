"""Per-phase latency breakdown of a running LLM service (exercise 9.8; ``lockgate profile``).

Sends N ``POST /generate`` (or ``/v1/chat/completions``) requests and splits each one's client-side
time into the phases the service reports in its ``Server-Timing`` header (auth, tokenize, queue,
prefill, decode, postprocess, total) plus ``network`` = client time - server total (connection, HTTP
parsing, BentoML's routing and body validation, and the wire itself). Prints p50/p99 per phase.

A client only (httpx); it lives in ``bentos`` so the profile and the service agree on phase names.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import httpx

#: What is profiled: ``/generate``, or the OpenAI API's ``/v1/chat/completions``.
Endpoint = Literal["generate", "chat"]
PHASES = ("network", "auth", "tokenize", "queue", "prefill", "decode", "postprocess")
DEFAULT_PROMPTS = (
    "Q: what is 3 plus 4?\nA:",
    "Q: what is 12 plus 9?\nA:",
    "Q: what is 27 plus 5?\nA:",
    "The quick brown fox",
)


class ProfileError(RuntimeError):
    """The service refused or failed a profiling request (the message names status and request)."""


def parse_server_timing(header: str) -> dict[str, float]:
    """``auth;dur=0.1, queue;dur=2.5`` → ``{"auth": 0.1, "queue": 2.5}`` (ms); entries without dur skip."""
    phases: dict[str, float] = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur" and name:
                phases[name] = float(value.strip().strip('"'))
    return phases


@dataclass(frozen=True)
class Sample:
    """One request: client time and the server's phases, all in ms."""

    client_ms: float
    phases: dict[str, float]

    @property
    def network_ms(self) -> float:
        return max(0.0, self.client_ms - self.phases.get("total", 0.0))


@dataclass
class Profile:
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def phase_values(self, phase: str) -> list[float]:
        if phase == "network":
            return [s.network_ms for s in self.samples]
        if phase == "client":
            return [s.client_ms for s in self.samples]
        return [s.phases.get(phase, 0.0) for s in self.samples]

    def summary(self) -> dict[str, dict[str, float]]:
        """p50/p99 (ms) and share of the mean client time, per phase, then server total and client."""
        mean_client = sum(self.phase_values("client")) / max(1, len(self.samples))
        rows: dict[str, dict[str, float]] = {}
        for phase in (*PHASES, "total", "client"):
            values = self.phase_values(phase)
            mean = sum(values) / max(1, len(values))
            rows[phase] = {
                "p50_ms": percentile(values, 50),
                "p99_ms": percentile(values, 99),
                "mean_share": mean / mean_client if mean_client > 0 else 0.0,
            }
        return rows


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples p99 is the slowest one)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def profile(
    url: str,
    n: int,
    concurrency: int = 1,
    max_new_tokens: int = 16,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    endpoint: Endpoint = "generate",
) -> Profile:
    """Send ``n`` requests (``concurrency`` at a time) to ``url``/generate (or, ``endpoint`` "chat",
    ``/v1/chat/completions`` with each prompt as one user message) and collect their phases."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = Profile()
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
        model = _served_model(client) if endpoint == "chat" else ""

        def one(i: int) -> Sample:
            prompt = prompts[i % len(prompts)]
            path, body = "/generate", {"prompt": prompt, "max_new_tokens": max_new_tokens}
            if endpoint == "chat":
                messages = [{"role": "user", "content": prompt}]
                path, body = (
                    "/v1/chat/completions",
                    {"model": model, "messages": messages, "max_tokens": max_new_tokens},
                )
            started = time.perf_counter()
            response = client.post(path, json=body)
            client_ms = (time.perf_counter() - started) * 1000.0
            if response.status_code != 200:
                request_id = response.headers.get("x-request-id", "?")
                raise ProfileError(
                    f"request {i} ({request_id}): HTTP {response.status_code} {response.text[:200]}"
                )
            timing = response.headers.get("server-timing")
            if not timing:
                raise ProfileError(f"request {i}: the service sent no Server-Timing header (too old?)")
            return Sample(client_ms, parse_server_timing(timing))

        with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
            for future in [pool.submit(one, i) for i in range(n)]:
                try:
                    result.samples.append(future.result())
                except (ProfileError, httpx.HTTPError) as exc:
                    result.failures.append(str(exc))
    return result


def _served_model(client: httpx.Client) -> str:
    """The model id the service lists at /v1/models (what an OpenAI client names in ``model``)."""
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ProfileError(f"GET /v1/models: HTTP {response.status_code} {response.text[:200]}")
    return str(response.json()["data"][0]["id"])


def format_table(result: Profile) -> str:
    """A fixed-width table: phase, p50, p99, share of the mean client time."""
    lines = [f"{'phase':<12} {'p50 ms':>10} {'p99 ms':>10} {'share':>7}"]
    for phase, row in result.summary().items():
        if phase == "total":
            lines.append("-" * 42)
            phase = "server"
        lines.append(f"{phase:<12} {row['p50_ms']:>10.2f} {row['p99_ms']:>10.2f} {row['mean_share']:>6.1%}")
    lines.append(f"{len(result.samples)} requests measured, {len(result.failures)} failed")
    return "\n".join(lines)
