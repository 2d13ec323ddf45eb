"""Stage 6: release the staged candidate by the spec's strategy — canary (default), blue-green or shadow.

Canary routing is sticky: a user's bucket is a hash of their id in [0, 100), and the user goes to the
canary while ``bucket < share``. As the share grows 5 → 10 → … → 100 a user on the canary stays there
and the canary's user set only grows.

Each step holds its share until its window has ``min_requests`` canary requests and lasts
``duration_s`` (at 100 % every request is also mirrored to stable, whose answer nobody gets, so the
last step is still compared with a concurrent baseline). The analysis (tasks/canary_analysis.py) is
fed every request, so a clearly bad canary is stopped mid-step by the sequential checks, and judges
the window at its end: pass → next step, fail → roll back, inconclusive → hold and extend the window
(up to ``analysis.max_extensions``), then fail. The decision is a registry transition
(tasks/registry.py) and is recorded in MLflow: per-step metrics with every test statistic,
``decision.json``, tags on the model versions.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx
from prefect import task

from tasks import registry, release_lock
from tasks.canary_analysis import (
    CanaryAnalyzer,
    CheckResult,
    Outcome,
    Target,
    Verdict,
    WindowStats,
    combine,
    judge_recorded,
    window_stats,
)
from tasks.errors import StageFailed
from tasks.log import get_logger
from tasks.registry import ModelVersionRef
from tasks.replay import Pacer, ReplayTraffic, send
from tasks.serving import ServiceProcess, launch_service, wait_ready
from tasks.settings import get_settings
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import CanarySpec, CanaryStep

__all__ = [
    "CanaryResult",
    "Outcome",
    "ReplayTraffic",
    "StepResult",
    "WindowStats",
    "apply_decision",
    "canary_task",
    "judge_step",
    "route",
    "run_canary",
    "send",
    "user_bucket",
    "window_stats",
]

log = get_logger(__name__)
Progress = Callable[[str], None]
#: Fewer successful stable requests than this in a step's window (a 100 % step has none): the window
#: checks compare against every stable request of the release instead.
MIN_STABLE_WINDOW = 20


def user_bucket(user_id: str) -> float:
    """Stable position of a user in [0, 100): the first 8 bytes of sha256, scaled."""
    digest = hashlib.sha256(user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def route(user_id: str, canary_share: float) -> Target:
    return "canary" if user_bucket(user_id) < canary_share else "stable"


@dataclass(frozen=True)
class StepResult:
    """One step (or phase of blue-green / shadow) as judged, with every check's numbers."""

    share: float
    verdict: Verdict
    checks: tuple[CheckResult, ...]
    canary: WindowStats
    stable: WindowStats
    extensions: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False  # a sequential check failed before the window was complete

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def reasons(self) -> tuple[str, ...]:
        """Messages of the checks that did not pass."""
        return tuple(f"{c.name}: {c.message}" for c in self.checks if c.verdict != "pass")

    @property
    def latency_p_value(self) -> float:
        return next((c.p_value for c in self.checks if c.name == "latency"), math.nan)


@dataclass(frozen=True)
class CanaryResult:
    steps: tuple[StepResult, ...]
    decision: Literal["promote", "rollback"]
    reason: str
    strategy: Literal["canary", "blue_green", "shadow"] = "canary"
    canary_requests: int = 0
    report: str | None = None  # the shadow report's path
    details: dict[str, float | str] = field(default_factory=dict)


def _stable_reference(window: list[Outcome], seen: list[Outcome]) -> list[Outcome]:
    if sum(o.ok for o in window) >= MIN_STABLE_WINDOW:
        return window
    return seen + window


def judge_step(share: float, canary: list[Outcome], stable: list[Outcome], spec: CanarySpec) -> StepResult:
    """Judge a recorded window of one step on its own (no sequential history before it)."""
    verdict, checks = judge_recorded(share, canary, stable, spec)
    return StepResult(share, verdict, checks, window_stats(canary), window_stats(stable))


def log_step(step: StepResult) -> None:
    log.info(
        "canary step %g%%: %s after %d canary req (success %.3f, p50 %.1f ms) vs %d stable req "
        "(p50 %.1f ms), %d extension(s)%s%s",
        step.share,
        step.verdict.upper(),
        step.canary.requests,
        step.canary.success_rate,
        step.canary.latency_p50_ms,
        step.stable.requests,
        step.stable.latency_p50_ms,
        step.extensions,
        ", stopped early" if step.stopped_early else "",
        "".join(f"\n  {r}" for r in step.reasons),
    )


Sender = Callable[[Target, str, str], Outcome]
"""Sends one request (target, prompt, user id) and returns its outcome: HTTP here, simulated in bench/."""


@dataclass
class _Traffic:
    """What the steps of one canary share: the replayed users, pacing, the sender and the analysis."""

    send: Sender
    traffic: ReplayTraffic
    pacer: Pacer
    analyzer: CanaryAnalyzer
    spec: CanarySpec
    report: Progress
    stable_seen: list[Outcome] = field(default_factory=list)


def _run_step(t: _Traffic, step: CanaryStep, phase: str) -> StepResult:
    """Hold ``step``'s share until its window is complete (extended while inconclusive) or a
    sequential check fails."""
    spec = t.spec
    need = spec.min_requests(step)
    started = time.monotonic()
    canary: list[Outcome] = []
    stable: list[Outcome] = []
    extensions, sent = 0, 0
    failing: tuple[CheckResult, ...] = ()
    while True:
        rounds = 1 + extensions
        while (
            len(canary) < need * rounds or time.monotonic() - started < (step.duration_s or 0) * rounds
        ) and sent < spec.max_requests_per_step * rounds:
            t.pacer.wait()
            user_id, prompt = t.traffic.next()
            target = route(user_id, step.share)
            outcome = t.send(target, prompt, user_id)
            sent += 1
            (canary if target == "canary" else stable).append(outcome)
            t.analyzer.observe(outcome)
            if step.share >= 100:
                # Nobody is served by stable any more, but comparing with stable's answers from earlier
                # steps compares two different times (a machine's load drifts: an identical candidate
                # measured x1.25 "slower" that way). A mirrored copy, never shown to the user, keeps a
                # concurrent baseline — as Kayenta runs a baseline next to the canary.
                mirrored = t.send("stable", prompt, user_id)
                stable.append(mirrored)
                t.analyzer.observe(mirrored)
            if sent % 50 == 0:
                t.report(phase)
            failing = t.analyzer.sequential_failure()
            if failing:
                break
        reference = _stable_reference(stable, t.stable_seen)
        if failing:  # stopped early: the window checks are reported too, for the record
            checks = (*failing, *t.analyzer.window_checks(canary, reference))
            verdict: Verdict = "fail"
            break
        checks = t.analyzer.judge_window(canary, reference, need * rounds)
        verdict = combine(checks)
        if verdict != "inconclusive":
            break
        if extensions >= spec.analysis.max_extensions:
            verdict = "fail"  # Argo's inconclusive limit: no verdict in time is a failure
            break
        extensions += 1
        t.report(f"{phase}, extension {extensions}")
        log.info("canary step %g%% inconclusive: window extended (%d)", step.share, extensions)
    t.stable_seen.extend(stable)
    return StepResult(
        step.share,
        verdict,
        tuple(checks),
        window_stats(canary),
        window_stats(reference),
        extensions,
        time.monotonic() - started,
        bool(failing),
    )


def run_steps(
    sender: Sender,
    prompts: list[str],
    spec: CanarySpec,
    progress: Progress | None = None,
    verbose: bool = True,
) -> CanaryResult:
    """Walk the steps with ``sender``; stop at the first failing step (rollback) or pass them all."""
    report = progress or (lambda _phase: None)
    shared = _Traffic(
        sender,
        ReplayTraffic(prompts, spec.users),
        Pacer(spec.traffic_per_s),
        CanaryAnalyzer.for_spec(spec),
        spec,
        report,
    )
    results: list[StepResult] = []
    for index, step in enumerate(spec.steps):
        phase = f"canary step {index + 1}/{len(spec.steps)} at {step.share:g}%"
        report(phase)
        result = _run_step(shared, step, phase)
        results.append(result)
        if verbose:
            log_step(result)
        if result.verdict == "fail":
            why = "; ".join(result.reasons)
            if all(c.verdict != "fail" for c in result.checks):
                why = f"inconclusive after {result.extensions} extension(s): {why}"
            reason = f"step {step.share:g}%: {why}"
            return CanaryResult(tuple(results), "rollback", reason, "canary", _canary_total(results))
    reason = f"all {len(results)} steps passed"
    return CanaryResult(tuple(results), "promote", reason, "canary", _canary_total(results))


def run_canary(
    stable_url: str,
    canary_url: str,
    prompts: list[str],
    spec: CanarySpec,
    progress: Progress | None = None,
) -> CanaryResult:
    """Replay ``prompts`` against the two services through the steps (see :func:`run_steps`).

    ``progress`` is called with a phase label at every step and about every 50 requests (the release
    lock's heartbeat)."""
    urls: dict[Target, str] = {"stable": stable_url, "canary": canary_url}
    with httpx.Client(timeout=60) as client:

        def sender(target: Target, prompt: str, user_id: str) -> Outcome:
            return send(client, urls[target], target, prompt, user_id, spec.max_new_tokens)

        return run_steps(sender, prompts, spec, progress)


def _canary_total(results: list[StepResult]) -> int:
    return sum(r.canary.requests for r in results)


def apply_decision(result: CanaryResult, candidate: ModelVersionRef, spec: CanarySpec, trigger: str) -> None:
    """The registry transition a canary or shadow verdict calls for (blue-green switches itself)."""
    if result.decision == "rollback":
        registry.roll_back_candidate(candidate, result.reason, trigger)
    elif spec.promote:
        registry.promote(candidate, result.reason, trigger)
    else:
        registry.mark_canary_passed(candidate, result.reason, trigger)


def _log_results(result: CanaryResult) -> None:
    import mlflow

    for index, step in enumerate(result.steps):
        metrics = {
            "share": step.share,
            "canary_requests": step.canary.requests,
            "stable_requests": step.stable.requests,
            "canary_success_rate": step.canary.success_rate,
            "canary_latency_p50_ms": step.canary.latency_p50_ms,
            "canary_latency_p95_ms": step.canary.latency_p95_ms,
            "stable_latency_p95_ms": step.stable.latency_p95_ms,
            "extensions": step.extensions,
            "verdict_fail": float(step.verdict == "fail"),
        }
        for check in step.checks:
            metrics[f"{check.name}.observed"] = check.observed
            metrics[f"{check.name}.p_value"] = check.p_value
            if check.evidence is not None:
                metrics[f"{check.name}.evidence"] = min(check.evidence, 1e300)
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        mlflow.log_metrics(finite, step=index)
    mlflow.log_metric("canary_requests_total", result.canary_requests)


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
    lock: release_lock.LockRef | None = None,
    report_dir: Path | None = None,
) -> CanaryResult:
    """Serve stable and candidate from the bento, run the spec's strategy, then promote or roll back by
    registry stage transitions. Services are stopped whatever happens; ``lock`` (the release lock) is
    renewed as the release goes and records the services, so a killed release can be cleaned up."""
    import mlflow

    heartbeat = release_lock.Heartbeat(lock, get_settings().release_lock_ttl_s)
    with stage_run(parent_run_id, "canary", **{"lockgate.strategy": spec.strategy}):
        mlflow.log_params(
            {
                "strategy": spec.strategy,
                "steps": ",".join(f"{s:g}" for s in spec.shares),
                "stable_version": stable.version,
                "candidate_version": candidate.version,
                "alpha": spec.analysis.alpha,
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
        if spec.strategy == "blue_green":
            from tasks.blue_green import blue_green_launches, run_blue_green

            services, failed = start_release_services(blue_green_launches(common, stable, candidate, spec))
            heartbeat("blue-green: services started", [s.process.pid for s in services])
            try:
                if failed is not None:
                    registry.roll_back_candidate(candidate, failed, trigger)
                    result = CanaryResult((), "rollback", failed, "blue_green")
                else:
                    result = run_blue_green(services, stable, candidate, prompts, spec, trigger, heartbeat)
            finally:
                for service in services:
                    service.stop()
        else:
            services, failed = start_release_services(
                [
                    {**common, "role": "stable", "model_uri": stable.uri},
                    {**common, "role": "canary", "model_uri": candidate.uri},
                ]
            )
            heartbeat(f"{spec.strategy}: services started", [s.process.pid for s in services])
            try:
                if failed is not None:
                    result = CanaryResult((), "rollback", failed, spec.strategy)
                elif spec.strategy == "shadow":
                    from tasks.shadow import run_shadow

                    result = run_shadow(
                        services[0].url,
                        services[1].url,
                        prompts,
                        spec,
                        report_dir or log_dir / "shadow",
                        heartbeat,
                    )
                else:
                    result = run_canary(services[0].url, services[1].url, prompts, spec, heartbeat)
            finally:
                for service in services:
                    service.stop()
        _log_results(result)
        mlflow.log_dict(_decision_record(result, stable, candidate), "decision.json")
        if result.report:
            mlflow.log_artifact(result.report, "shadow")
            html = Path(result.report).with_suffix(".html")
            if html.is_file():
                mlflow.log_artifact(str(html), "shadow")
        mlflow.set_tag("lockgate.decision", result.decision)
        heartbeat(f"{spec.strategy}: applying decision {result.decision}")
        if spec.strategy != "blue_green":
            apply_decision(result, candidate, spec, trigger)
    return result


#: Roles of the candidate's own services: one that cannot start is the candidate's failure.
CANDIDATE_ROLES = ("canary", "green")


def start_release_services(
    launches: list[dict], ready_timeout_s: float = 180
) -> tuple[list[ServiceProcess], str | None]:
    """Launch every service at once (start-ups overlap), then wait for each to be ready.

    A candidate service that never becomes ready (its model does not load, it crashes in warm-up) is
    the candidate failing — like a canary whose pods never get ready in Argo — and is returned as a
    rollback reason with the stable services still running; any other failure stops all and raises."""
    services = [launch_service(**kwargs) for kwargs in launches]
    try:
        for service in services:
            try:
                wait_ready(service, ready_timeout_s)
            except StageFailed as exc:
                if service.role not in CANDIDATE_ROLES:
                    raise
                log.warning("candidate service failed to start: %s", exc)
                service.stop()
                return [s for s in services if s is not service], f"candidate service failed to start: {exc}"
            log.info("%s service ready at %s", service.role, service.url)
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services, None


def _decision_record(result: CanaryResult, stable: ModelVersionRef, candidate: ModelVersionRef) -> dict:
    def clean(value: object) -> object:
        # JSON has no NaN/inf: the decision artifact must be readable by any JSON parser.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(
        {
            "strategy": result.strategy,
            "decision": result.decision,
            "reason": result.reason,
            "stable": stable.uri,
            "candidate": candidate.uri,
            "canary_requests": result.canary_requests,
            "details": result.details,
            "steps": [{**asdict(s), "passed": s.passed} for s in result.steps],
        }
    )  # type: ignore[return-value]
