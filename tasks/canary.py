"""Stage 6: progressive canary between the stable (Production) and candidate (Staging) services.

Routing is sticky: a user's bucket is a hash of their id in [0, 100), and the user goes to the
canary while ``bucket < share``. As the share grows 5 → 10 → … → 100 a user on the canary stays
there and the canary's user set only grows. Each step is judged on its own window of canary
requests against the stable requests seen so far (at 100 % stable gets no new traffic).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx
import numpy as np
from prefect import task

from tasks import registry
from tasks.log import get_logger
from tasks.registry import ModelVersionRef
from tasks.serving import start_services
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import CanarySpec

log = get_logger(__name__)
Target = Literal["stable", "canary"]


def user_bucket(user_id: str) -> float:
    """Stable position of a user in [0, 100): the first 8 bytes of sha256, scaled."""
    digest = hashlib.sha256(user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def route(user_id: str, canary_share: float) -> Target:
    return "canary" if user_bucket(user_id) < canary_share else "stable"


@dataclass(frozen=True)
class Outcome:
    target: Target
    ok: bool
    latency_ms: float
    status_code: int


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    latency_p50_ms: float
    latency_p95_ms: float

    @property
    def success_rate(self) -> float:
        return 1 - self.errors / self.requests if self.requests else math.nan

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


def window_stats(outcomes: list[Outcome]) -> WindowStats:
    ok_latencies = [o.latency_ms for o in outcomes if o.ok]
    p50 = float(np.percentile(ok_latencies, 50)) if ok_latencies else math.nan
    p95 = float(np.percentile(ok_latencies, 95)) if ok_latencies else math.nan
    return WindowStats(len(outcomes), sum(not o.ok for o in outcomes), p50, p95)


@dataclass(frozen=True)
class StepResult:
    share: float
    canary: WindowStats
    stable: WindowStats
    latency_p_value: float  # Mann-Whitney U, two-sided (chapter: p > 0.05 means no significant difference)
    passed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class CanaryResult:
    steps: tuple[StepResult, ...]
    decision: Literal["promote", "rollback"]
    reason: str


def judge_step(share: float, canary: list[Outcome], stable: list[Outcome], spec: CanarySpec) -> StepResult:
    """Pass/fail of one step from the spec's thresholds."""
    from scipy.stats import mannwhitneyu

    c, s = window_stats(canary), window_stats(stable)
    t = spec.thresholds
    reasons: list[str] = []
    if c.requests < spec.min_canary_requests:
        reasons.append(
            f"only {c.requests} canary requests (< min_canary_requests {spec.min_canary_requests})"
        )
    elif c.success_rate < t.min_success_rate:
        reasons.append(f"canary success rate {c.success_rate:.3f} < {t.min_success_rate}")
    if s.requests and c.requests and c.error_rate - s.error_rate > t.max_error_rate_increase:
        reasons.append(
            f"canary error rate {c.error_rate:.3f} exceeds stable {s.error_rate:.3f} "
            f"by more than {t.max_error_rate_increase}"
        )
    if s.requests and c.requests and not math.isnan(c.latency_p95_ms) and not math.isnan(s.latency_p95_ms):
        ratio = c.latency_p95_ms / s.latency_p95_ms
        if ratio > t.max_latency_p95_ratio:
            reasons.append(f"canary p95 latency x{ratio:.2f} of stable (> {t.max_latency_p95_ratio})")
    c_lat = [o.latency_ms for o in canary if o.ok]
    s_lat = [o.latency_ms for o in stable if o.ok]
    p_value = float(mannwhitneyu(c_lat, s_lat).pvalue) if len(c_lat) >= 2 and len(s_lat) >= 2 else math.nan
    return StepResult(share, c, s, p_value, not reasons, tuple(reasons))


@dataclass
class ReplayTraffic:
    """Replays prompts as users ``user-0 … user-{n-1}`` round-robin."""

    prompts: list[str]
    users: int
    _cycle: itertools.count = field(default_factory=itertools.count)

    def next(self) -> tuple[str, str]:
        i = next(self._cycle)
        return f"user-{i % self.users}", self.prompts[i % len(self.prompts)]


def send(
    client: httpx.Client, url: str, target: Target, prompt: str, user_id: str, max_new_tokens: int
) -> Outcome:
    """One request; any transport error or non-2xx counts as a failed request, never raised."""
    started = time.perf_counter()
    try:
        response = client.post(
            f"{url}/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens, "user_id": user_id}
        )
        code = response.status_code
    except httpx.TransportError:
        code = 0  # a dead or hung server is an error of that version, which is what we measure
    return Outcome(target, 200 <= code < 300, (time.perf_counter() - started) * 1000, code)


def run_canary(stable_url: str, canary_url: str, prompts: list[str], spec: CanarySpec) -> CanaryResult:
    """Walk the steps; stop at the first failing step (rollback) or pass them all (promote)."""
    traffic = ReplayTraffic(prompts, spec.users)
    urls = {"stable": stable_url, "canary": canary_url}
    stable_seen: list[Outcome] = []
    results: list[StepResult] = []
    with httpx.Client(timeout=60) as client:
        for share in spec.steps:
            canary_window: list[Outcome] = []
            for _ in range(spec.max_requests_per_step):
                user_id, prompt = traffic.next()
                target = route(user_id, share)
                outcome = send(client, urls[target], target, prompt, user_id, spec.max_new_tokens)
                (canary_window if target == "canary" else stable_seen).append(outcome)
                if len(canary_window) >= spec.min_canary_requests:
                    break
            step = judge_step(share, canary_window, stable_seen, spec)
            results.append(step)
            log.info(
                "canary step %g%%: canary %d req (success %.3f, p95 %.1f ms), "
                "stable %d req (p95 %.1f ms) -> %s",
                share,
                step.canary.requests,
                step.canary.success_rate,
                step.canary.latency_p95_ms,
                step.stable.requests,
                step.stable.latency_p95_ms,
                "pass" if step.passed else "FAIL",
            )
            if not step.passed:
                reason = f"step {share:g}%: " + "; ".join(step.reasons)
                return CanaryResult(tuple(results), "rollback", reason)
    return CanaryResult(tuple(results), "promote", f"all {len(results)} steps passed")


@task(name="canary")
def canary_task(
    bento_tag: str,
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    prompts: list[str],
    spec: CanarySpec,
    request_log: Path,
    log_dir: Path,
    parent_run_id: str | None,
    trigger: str,
) -> CanaryResult:
    """Serve stable and candidate from the bento, replay traffic through the steps, then promote or
    roll back by registry stage transitions. Services are stopped whatever happens."""
    import mlflow

    with stage_run(parent_run_id, "canary"):
        mlflow.log_params(
            {
                "steps": ",".join(f"{s:g}" for s in spec.steps),
                "stable_version": stable.version,
                "candidate_version": candidate.version,
            }
        )
        # Two services share this machine: split its cores between them.
        threads = max(1, (os.cpu_count() or 2) // 2)
        common = {
            "target": bento_tag,
            "request_log": request_log,
            "log_dir": log_dir,
            "torch_threads": threads,
        }
        stable_service, canary_service = start_services(
            [
                {**common, "role": "stable", "model_uri": stable.uri},
                {**common, "role": "canary", "model_uri": candidate.uri},
            ]
        )
        with stable_service, canary_service:
            result = run_canary(stable_service.url, canary_service.url, prompts, spec)
        for index, step in enumerate(result.steps):
            mlflow.log_metrics(
                {
                    "share": step.share,
                    "canary_requests": step.canary.requests,
                    "canary_success_rate": step.canary.success_rate,
                    "canary_latency_p95_ms": step.canary.latency_p95_ms,
                    "stable_latency_p95_ms": step.stable.latency_p95_ms,
                    "latency_mannwhitney_p": step.latency_p_value,
                },
                step=index,
            )
        mlflow.log_dict(_decision_record(result, stable, candidate), "decision.json")
        mlflow.set_tag("lockgate.decision", result.decision)
        if result.decision == "promote" and spec.promote:
            registry.promote(candidate, result.reason, trigger)
        elif result.decision == "rollback":
            registry.roll_back_candidate(candidate, result.reason, trigger)
    return result


def _decision_record(result: CanaryResult, stable: ModelVersionRef, candidate: ModelVersionRef) -> dict:
    return {
        "decision": result.decision,
        "reason": result.reason,
        "stable": stable.uri,
        "candidate": candidate.uri,
        "steps": [asdict(s) for s in result.steps],
    }
