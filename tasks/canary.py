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

Users never pay for a broken candidate's failures: requests go through a failover router
(tasks/replay.py) that answers from stable whatever the canary could not answer, and a candidate
process that is gone stops the canary at once (``serving`` check failed → rollback). After every
passed step the canary's state is persisted (:class:`CanaryState`: ``<home>/canary-state/MODEL.json``
plus a tag on its MLflow run), so a release killed mid-canary is resumed by its restart after the last
completed step (tasks/recovery.py decides whether it may) instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
from tasks.replay import FailoverRouter, Pacer, ReplayTraffic, send
from tasks.serving import ServiceProcess, launch_service, wait_ready
from tasks.settings import get_settings
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import CanarySpec, CanaryStep

__all__ = [
    "CanaryResult",
    "CanaryState",
    "Checkpoint",
    "Outcome",
    "ReplayTraffic",
    "StepResult",
    "WindowStats",
    "apply_decision",
    "canary_task",
    "judge_step",
    "release_outcome",
    "resume_canary",
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
Health = Callable[[], "str | None"]
"""None while the candidate is believed alive, else why it is dead (the canary stops at once)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a canary has completed, enough to resume it after its release was killed: the judged steps
    and every outcome the analysis observed, in order. Replaying the outcomes rebuilds the e-processes
    exactly, so a resumed canary keeps one always-valid error budget instead of starting a new test
    (each restart with a fresh test would spend ``alpha`` again)."""

    steps: tuple[StepResult, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    replayed: int = 0  # user requests replayed so far: the replayed users continue where they were


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
            reason = f"step {step.share:g}%: {why}"
            return CanaryResult(tuple(results), "rollback", reason, "canary", _canary_total(results))
        if on_step is not None:
            on_step(Checkpoint(tuple(results), tuple(shared.observed), shared.replayed))
    reason = f"all {len(results)} steps passed"
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

    Requests go through a :class:`~tasks.replay.FailoverRouter`: a request the canary cannot answer is
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


# -- persisted state: resuming a canary whose release was killed -----------------------------------
@dataclass(frozen=True)
class CanaryState:
    """A canary in progress, as persisted after every completed step (``<home>/canary-state/``).

    Enough for a restarted release to resume it (tasks/recovery.py decides whether it may): the two
    versions, the bento and prompts it replays, a hash of the canary spec (a changed plan is not
    resumed) and the :class:`Checkpoint`. A file of its own, not the release-lock row: the lock row
    is replaced when a restarted release takes the lock over, and the state must outlive that."""

    stable: ModelVersionRef
    candidate: ModelVersionRef
    bento_tag: str
    prompts: tuple[str, ...]
    spec_sha256: str
    request_log: str
    log_dir: str
    report_dir: str | None
    mlflow_run_id: str | None  # the release run that started the canary
    checkpoint: Checkpoint = Checkpoint()


def canary_spec_sha256(spec: CanarySpec) -> str:
    """What must be unchanged for a canary to be resumed: the plan and its analysis (not the
    ``on_interrupt`` choice itself)."""
    return hashlib.sha256(spec.model_dump_json(exclude={"on_interrupt"}).encode()).hexdigest()


def state_path(model: str) -> Path:
    return get_settings().home / "canary-state" / f"{model}.json"


def _outcome_row(o: Outcome) -> list:
    return [o.target, o.ok, o.latency_ms, o.status_code, o.output_tokens, o.empty, o.ttft_ms]


def _step_from_dict(d: dict) -> StepResult:
    return StepResult(
        share=d["share"],
        verdict=d["verdict"],
        checks=tuple(CheckResult(**c) for c in d["checks"]),
        canary=WindowStats(**d["canary"]),
        stable=WindowStats(**d["stable"]),
        extensions=d["extensions"],
        elapsed_s=d["elapsed_s"],
        stopped_early=d["stopped_early"],
    )


def save_state(state: CanaryState) -> Path:
    """Write the state atomically (a reader sees the previous or the new checkpoint, never half)."""
    path = state_path(state.candidate.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": 1,
        "stable": asdict(state.stable),
        "candidate": asdict(state.candidate),
        "bento_tag": state.bento_tag,
        "prompts": list(state.prompts),
        "spec_sha256": state.spec_sha256,
        "request_log": state.request_log,
        "log_dir": state.log_dir,
        "report_dir": state.report_dir,
        "mlflow_run_id": state.mlflow_run_id,
        "steps": [asdict(step) for step in state.checkpoint.steps],
        "outcomes": [_outcome_row(o) for o in state.checkpoint.outcomes],
        "replayed": state.checkpoint.replayed,
        "saved_at": time.time(),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle)  # NaN stays NaN: Python's json reads it back
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_state(model: str) -> CanaryState | None:
    """The persisted canary of ``model``, or None (no file, or one this version cannot read)."""
    path = state_path(model)
    try:
        body = json.loads(path.read_text())
        checkpoint = Checkpoint(
            tuple(_step_from_dict(d) for d in body["steps"]),
            tuple(Outcome(*row) for row in body["outcomes"]),
            int(body["replayed"]),
        )
        return CanaryState(
            stable=ModelVersionRef(**body["stable"]),
            candidate=ModelVersionRef(**body["candidate"]),
            bento_tag=body["bento_tag"],
            prompts=tuple(body["prompts"]),
            spec_sha256=body["spec_sha256"],
            request_log=body["request_log"],
            log_dir=body["log_dir"],
            report_dir=body["report_dir"],
            mlflow_run_id=body["mlflow_run_id"],
            checkpoint=checkpoint,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A state that cannot be read cannot be resumed: recovery rolls the candidate back instead.
        log.warning("canary state %s unreadable (%s): not resumable", path, exc)
        return None


def clear_state(model: str) -> bool:
    """Remove the persisted canary of ``model`` (decided, or rolled back); False when there was none."""
    try:
        state_path(model).unlink()
    except FileNotFoundError:
        return False
    return True


def release_outcome(result: CanaryResult, spec: CanarySpec) -> str:
    """The release summary's outcome for a canary result."""
    if result.decision == "rollback":
        return "rolled_back"
    return "promoted" if spec.promote else "staged"


def resume_canary(
    state: CanaryState,
    spec: CanarySpec,
    parent_run_id: str | None,
    trigger: str,
    lock: release_lock.LockRef | None = None,
) -> CanaryResult:
    """Run the rest of a persisted canary (fresh services from the same bento) and decide it."""
    done = len(state.checkpoint.steps)
    log.warning(
        "resuming the canary of %s v%s after %d of %d completed step(s)",
        state.candidate.name,
        state.candidate.version,
        done,
        len(spec.steps),
    )
    return canary_task(
        state.bento_tag,
        state.stable,
        state.candidate,
        list(state.prompts),
        spec,
        Path(state.request_log),
        Path(state.log_dir),
        parent_run_id,
        trigger,
        lock,
        Path(state.report_dir) if state.report_dir else None,
        resume_from=state,
    )


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
    resume_from: CanaryState | None = None,
) -> CanaryResult:
    """Serve stable and candidate from the bento, run the spec's strategy, then promote or roll back by
    registry stage transitions. Services are stopped whatever happens; ``lock`` (the release lock) is
    renewed as the release goes and records the services, so a killed release can be cleaned up.

    A canary persists a :class:`CanaryState` after every completed step (removed once decided), so a
    release killed mid-canary can be resumed (``resume_from``, see :func:`resume_canary`)."""
    import mlflow

    heartbeat = release_lock.Heartbeat(lock, get_settings().release_lock_ttl_s)
    state = resume_from or CanaryState(
        stable,
        candidate,
        bento_tag,
        tuple(prompts),
        canary_spec_sha256(spec),
        str(request_log),
        str(log_dir),
        str(report_dir) if report_dir else None,
        parent_run_id,
    )
    resumed = (
        {
            "lockgate.canary.resumed_from_run": state.mlflow_run_id or "",
            "lockgate.canary.resumed_after_steps": str(len(state.checkpoint.steps)),
        }
        if resume_from
        else {}
    )
    with stage_run(parent_run_id, "canary", **{"lockgate.strategy": spec.strategy}, **resumed):
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
                    result = run_canary(
                        services[0].url,
                        services[1].url,
                        prompts,
                        spec,
                        heartbeat,
                        state.checkpoint,
                        _checkpointer(state, len(spec.steps)),
                    )
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
        clear_state(candidate.name)  # decided: nothing left to resume
    return result


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
