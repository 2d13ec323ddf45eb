"""The canary strategy: a stepwise traffic shift to the candidate, judged step by step.

Canary routing is sticky: a user's bucket is a hash of their id in [0, 100), and the user goes to the
canary while ``bucket < share``. As the share grows 5 → 10 → … → 100 a user on the canary stays there
and the canary's user set only grows.

Each step holds its share until its window has ``min_requests`` canary requests and lasts
``duration_s`` (at 100 % every request is also mirrored to stable, whose answer nobody gets, so the
last step is still compared with a concurrent baseline). The analysis (tasks/release/analysis.py) is
fed every request, so a clearly bad canary is stopped mid-step by the sequential checks, and judges
the window at its end: pass → next step, fail → roll back, inconclusive → hold and extend the window
(up to ``analysis.max_extensions``), then fail.

Users never pay for a broken candidate's failures: requests go through a failover router
(tasks/release/replay.py) that answers from stable whatever the canary could not answer, and a candidate
process that is gone stops the canary at once (``serving`` check failed → rollback). After every
passed step the canary's state is persisted (tasks/release/state.py), so a release killed mid-canary is
resumed by its restart after the last completed step instead of starting over.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import httpx

from lockgate.bentos.rollout import bucket
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.progress import arm_requests, heartbeat
from lockgate.tasks.release.analysis import (
    CanaryAnalyzer,
    CheckResult,
    Outcome,
    Target,
    Verdict,
    combine,
    judge_recorded,
    window_stats,
)
from lockgate.tasks.release.outcome import CanaryResult, Progress, StepResult, latency_evidence, log_step
from lockgate.tasks.release.replay import FailoverRouter, Pacer, ReplayTraffic
from lockgate.tasks.release.state import CanaryState, Checkpoint, save_state
from lockgate.tasks.release.strategy import ReleaseRun, serve

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec, CanaryStep

log = get_logger(__name__)

#: Fewer successful stable requests than this in a step's window (a 100 % step has none): the window
#: checks compare against every stable request of the release instead.
MIN_STABLE_WINDOW = 20


# One hash for rehearsal and production: a user lands in the same bucket in a replayed canary and
# behind the production router (bentos/rollout.py).
user_bucket = bucket


def route(user_id: str, canary_share: float) -> Target:
    return "canary" if user_bucket(user_id) < canary_share else "stable"


def _stable_reference(window: list[Outcome], seen: list[Outcome]) -> list[Outcome]:
    if sum(o.ok for o in window) >= MIN_STABLE_WINDOW:
        return window
    return seen + window


def judge_step(share: float, canary: list[Outcome], stable: list[Outcome], spec: CanarySpec) -> StepResult:
    """Judge a recorded window of one step on its own (no sequential history before it)."""
    verdict, checks = judge_recorded(share, canary, stable, spec)
    return StepResult(share, verdict, checks, window_stats(canary), window_stats(stable))


Sender = Callable[[Target, str, str], Outcome]
"""Sends one request (target, prompt, user id) and returns its outcome: HTTP here, simulated in bench/."""
Health = Callable[[], "str | None"]
"""None while the candidate is believed alive, else why it is dead (the canary stops at once)."""


@dataclass
class _Traffic:
    """What the steps of one canary share: the replayed users, pacing, the sender and the analysis."""

    send: Sender
    mirror: Sender  # copies nobody waits for (the 100 % step's stable baseline)
    health: Health
    traffic: ReplayTraffic
    pacer: Pacer
    analyzer: CanaryAnalyzer
    spec: CanarySpec
    report: Progress
    stable_seen: list[Outcome] = field(default_factory=list)
    observed: list[Outcome] = field(default_factory=list)  # in the analyzer's order, for checkpoints
    replayed: int = 0

    def observe(self, outcome: Outcome) -> None:
        self.analyzer.observe(outcome)
        self.observed.append(outcome)


def _dead_check(why: str) -> CheckResult:
    return CheckResult("serving", "fail", why, math.nan, math.nan, math.nan, math.nan)


def _run_step(t: _Traffic, step: CanaryStep, phase: str) -> StepResult:
    """Hold ``step``'s share until its window is complete (extended while inconclusive) or a
    sequential check fails; the terminal's heartbeat says the requests per arm meanwhile."""
    canary: list[Outcome] = []
    stable: list[Outcome] = []  # at 100 %: the mirrored copies
    with heartbeat(lambda: f"{phase}: {arm_requests(len(canary), len(stable))}"):
        return _hold_step(t, step, phase, canary, stable)


def _hold_step(
    t: _Traffic, step: CanaryStep, phase: str, canary: list[Outcome], stable: list[Outcome]
) -> StepResult:
    spec = t.spec
    need = spec.min_requests(step)
    started = time.monotonic()
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
            t.replayed += 1
            (canary if target == "canary" else stable).append(outcome)
            t.observe(outcome)
            if step.share >= 100:
                # Nobody is served by stable any more, but comparing with stable's answers from earlier
                # steps compares two different times (a machine's load drifts: an identical candidate
                # measured x1.25 "slower" that way). A mirrored copy, never shown to the user, keeps a
                # concurrent baseline — as Kayenta runs a baseline next to the canary.
                mirrored = t.mirror("stable", prompt, user_id)
                stable.append(mirrored)
                t.observe(mirrored)
            if sent % 50 == 0:
                t.report(phase)
            dead = t.health()
            failing = (_dead_check(dead),) if dead else t.analyzer.sequential_failure()
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
    *,
    mirror: Sender | None = None,
    health: Health | None = None,
    checkpoint: Checkpoint | None = None,
    on_step: Callable[[Checkpoint], None] | None = None,
) -> CanaryResult:
    """Walk the steps with ``sender``; stop at the first failing step (rollback) or pass them all.

    ``checkpoint`` resumes after its completed steps; ``on_step`` receives a new checkpoint after every
    passed step (the canary task persists it); ``health`` is asked after every request."""
    report = progress or (lambda _phase: None)
    start = checkpoint or Checkpoint()
    if any(r.verdict == "fail" for r in start.steps) or len(start.steps) > len(spec.steps):
        raise ValueError("a checkpoint holds only passed steps, at most as many as the spec has")
    shared = _Traffic(
        sender,
        mirror or sender,
        health or (lambda: None),
        ReplayTraffic(prompts, spec.users, itertools.count(start.replayed)),
        Pacer(spec.traffic_per_s),
        CanaryAnalyzer.for_spec(spec),
        spec,
        report,
        replayed=start.replayed,
    )
    for outcome in start.outcomes:
        shared.observe(outcome)
    shared.stable_seen = [o for o in start.outcomes if o.target == "stable"]
    results: list[StepResult] = list(start.steps)
    for index, step in enumerate(spec.steps[len(results) :], start=len(results)):
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
            reason = f"step {step.share:g}%: {why} ({latency_evidence(results)})"
            return CanaryResult(tuple(results), "rollback", reason, "canary", _canary_total(results))
        if on_step is not None:
            on_step(Checkpoint(tuple(results), tuple(shared.observed), shared.replayed))
    reason = f"all {len(results)} steps passed ({latency_evidence(results)})"
    return CanaryResult(tuple(results), "promote", reason, "canary", _canary_total(results))


def run_canary(
    stable_url: str,
    canary_url: str,
    prompts: list[str],
    spec: CanarySpec,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    on_step: Callable[[Checkpoint], None] | None = None,
) -> CanaryResult:
    """Replay ``prompts`` against the two services through the steps (see :func:`run_steps`).

    Requests go through a :class:`~tasks.release.replay.FailoverRouter`: a request the canary cannot answer is
    answered by stable, and a candidate whose process is gone stops the canary (rollback). The
    result's ``details`` count what users saw: ``client_requests``, ``client_failed`` (no answer at
    all), ``failovers``. ``progress`` is called with a phase label at every step and about every 50
    requests (the release lock's heartbeat)."""
    with httpx.Client(timeout=60) as client:
        router = FailoverRouter(client, stable_url, canary_url, spec.max_new_tokens)
        result = run_steps(
            router.send,
            prompts,
            spec,
            progress,
            mirror=router.mirror,
            health=router.health,
            checkpoint=checkpoint,
            on_step=on_step,
        )
    counts = router.counts
    details: dict[str, float | str] = {
        **result.details,
        "client_requests": counts.requests,
        "client_failed": counts.failed,
        "failovers": counts.failovers,
    }
    if router.dead:
        details["candidate_dead"] = router.dead
    if counts.failovers:
        log.warning(
            "%d canary request(s) failed over to stable; %d of %d user request(s) got no answer",
            counts.failovers,
            counts.failed,
            counts.requests,
        )
    return replace(result, details=details)


def _canary_total(results: list[StepResult]) -> int:
    return sum(r.canary.requests for r in results)


def _checkpointer(state: CanaryState, planned: int) -> Callable[[Checkpoint], None]:
    """Persists each new checkpoint: the state file, and a tag on the canary's MLflow run."""
    import mlflow

    def save(checkpoint: Checkpoint) -> None:
        path = save_state(replace(state, checkpoint=checkpoint))
        mlflow.set_tags(
            {
                "lockgate.canary.completed_steps": f"{len(checkpoint.steps)}/{planned}",
                "lockgate.canary.state": str(path),
            }
        )

    save(state.checkpoint)  # before the first step: a canary killed in it is resumable too
    return save


def release(run: ReleaseRun) -> CanaryResult:
    """The canary strategy's entry point: serve stable and candidate, walk the steps from the run's
    checkpoint, persist a checkpoint after every passed step."""
    state, launch = run.state, run.launch
    launches = [
        {**launch, "role": "stable", "model_uri": state.stable.uri},
        {**launch, "role": "canary", "model_uri": state.candidate.uri},
    ]
    with serve(run, launches) as (services, failed):
        if failed is not None:
            return CanaryResult((), "rollback", failed, "canary")
        return run_canary(
            services[0].url,
            services[1].url,
            run.prompts,
            run.spec,
            run.heartbeat,
            state.checkpoint,
            _checkpointer(state, len(run.spec.steps)),
        )
