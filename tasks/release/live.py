"""The live canary: the users' own requests, through the production router, decide the release.

The flow never sends a request. For each step it sets the candidate's share in the registry
(tasks/platform/model_registry.py ``set_rollout``); every router replica (bentos/router.py) follows it
within its poll interval and logs one row per live request (its own SQLite file, or the table all
replicas share in team mode: bentos/live_store.py). The flow tails all replicas' rows
(:func:`live_store`'s ``tail``) and feeds each arm's outcomes to the same
analysis as the replayed canary (tasks/release/analysis.py): every row goes to the sequential checks
(a bad candidate is stopped mid-step), the rows inside a step's window to the window checks.

The release is held in the registry, not in this process: the share, the step, ``paused``,
``awaiting_approval``, an operator's ``aborting``. Operators act through the registry
(`lockgate canary pause|resume|abort|approve`), and a restarted worker (`lockgate canary start`
again) resumes at the step the registry holds — an approval wait included.

Decisions are the usual registry transitions (``apply_decision``): on rollback the share goes to 0
*first*, so the routers stop sending users to the candidate at their next poll, then the candidate is
archived (its ``canary`` alias removed, which stops any router that missed the share change).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from lockgate.bentos.live_store import LiveRowTail, LiveStore, open_live_store
from lockgate.bentos.rollout import (
    TAG_ABORT_REASON,
    TAG_APPROVED_AT,
    TAG_APPROVED_BY,
    TAG_BASELINE,
    TAG_CANDIDATE,
    TAG_NOTE,
    TAG_SHARE,
    TAG_STATE,
    TAG_STEP,
    TAG_STEP_STARTED,
    LiveRow,
)
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.platform.progress import arm_requests, heartbeat
from lockgate.tasks.platform.settings import get_settings
from lockgate.tasks.platform.tracking import stage_run
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.analysis import CanaryAnalyzer, CheckResult, Outcome, combine, window_stats
from lockgate.tasks.release.canary_strategy import MIN_STABLE_WINDOW
from lockgate.tasks.release.outcome import CanaryResult, StepResult, apply_decision, log_step

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec, CanaryStep

log = get_logger(__name__)
Progress = Callable[[str], None]
#: A router heartbeat older than this many poll intervals (plus a margin) is a router that is gone.
_HEARTBEAT_POLLS = 3


def live_dir(model: str) -> Path:
    """Where the routers of ``model`` on this machine write their live logs and heartbeats."""
    return get_settings().home / "live" / model


def live_store(model: str) -> LiveStore:
    """Where the routers of ``model`` log their live requests, by the setting they share
    (``LOCKGATE_LIVE_LOG_URL``): the team's shared PostgreSQL table, else each replica's SQLite file in
    :func:`live_dir` (replicas on this machine only)."""
    return open_live_store(get_settings().live_log_url, live_dir(model))


def running_routers(model: str) -> list[dict]:
    """Router replicas of ``model`` alive on this machine (fresh heartbeat, process alive)."""
    alive = []
    for path in sorted((live_dir(model) / "routers").glob("*.json")):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or not a heartbeat
        fresh = time.time() - float(beat.get("polled_at", 0)) < _HEARTBEAT_POLLS * beat.get("poll_s", 2) + 5
        if fresh and _pid_alive(int(beat.get("pid", 0))):
            alive.append(beat)
    return alive


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_traffic(spec: CanarySpec, model: str) -> tuple[str, str]:
    """(mode, why): ``live`` or ``replay`` for this release, and the reason the summary shows."""
    routers = running_routers(model) if spec.strategy == "canary" else []
    if spec.traffic == "replay":
        return "replay", "canary.traffic: replay in the spec (rehearsal on replayed evaluation prompts)"
    if spec.traffic == "live":
        if spec.strategy != "canary":
            raise ValueError(f"canary.traffic: live needs strategy canary, not {spec.strategy}")
        return "live", f"canary.traffic: live in the spec ({len(routers)} production router(s) running)"
    if spec.strategy != "canary":
        return "replay", f"strategy {spec.strategy} replays traffic"
    if routers:
        return "live", f"a production router of {model} is running ({len(routers)} replica(s)): live canary"
    return "replay", f"no production router of {model} is running (`lockgate serve`): replayed rehearsal"


def row_outcome(row: LiveRow) -> Outcome:
    """A live row as the analysis' outcome of the arm it was routed to (a failover is the canary's
    own failure: the user got stable's answer, the verdict still sees the failure)."""
    return Outcome(
        row.role, row.arm_ok, row.latency_ms, row.status_code, row.output_tokens, row.empty, row.ttft_ms
    )


# ----------------------------------------------------------------------------------------- control
@dataclass(frozen=True)
class Control:
    """The operator-facing part of the registry's rollout tags."""

    state: str
    abort_reason: str | None
    approved_by: str | None

    @classmethod
    def read(cls, model: str) -> Control:
        tags = registry.rollout_tags(model)
        return cls(tags.get(TAG_STATE, ""), tags.get(TAG_ABORT_REASON), tags.get(TAG_APPROVED_BY))


class Aborted(Exception):
    """An operator aborted the canary (`lockgate canary abort`)."""


@dataclass
class _Live:
    """What the steps of one live canary share: the arms, the log tail, the analysis, counters."""

    stable: ModelVersionRef
    candidate: ModelVersionRef
    spec: CanarySpec
    tail: LiveRowTail
    analyzer: CanaryAnalyzer
    report: Progress
    trigger: str
    stable_seen: list[Outcome] = field(default_factory=list)
    first_canary_ts: float | None = None
    requests: int = 0
    failovers: int = 0
    failed: int = 0  # user requests nobody answered
    canary_requests: int = 0
    sticky_moves: int = 0

    def read(self) -> list[tuple[float, Outcome]]:
        """New rows of the two arms (every replica), as (ts, outcome); all fed to the analysis."""
        arms = {("stable", self.stable.version), ("canary", self.candidate.version)}
        fresh = []
        for row in self.tail.read():
            if (row.role, row.version) not in arms:
                continue  # another version (a router that has not polled yet) or another rollout
            outcome = row_outcome(row)
            self.analyzer.observe(outcome)
            self.requests += 1
            self.failovers += row.outcome == "failover"
            self.failed += row.outcome == "failed"
            if row.role == "canary":
                self.canary_requests += 1
                self.first_canary_ts = self.first_canary_ts or row.ts
            fresh.append((row.ts, outcome))
        return fresh

    def control(self) -> Control:
        control = Control.read(self.candidate.name)
        if control.state == "aborting":
            raise Aborted(control.abort_reason or "aborted by an operator")
        return control


def _set_step(live: _Live, share: float, state: str, step: tuple[int, int], note: str) -> None:
    """Set the share for step ``(index, count)`` (0-based index), stamped with when it started."""
    registry.set_rollout(
        live.candidate.name,
        {
            TAG_CANDIDATE: live.candidate.version,
            TAG_BASELINE: live.stable.version,
            TAG_SHARE: f"{share:g}",
            TAG_STATE: state,
            TAG_STEP: f"{step[0] + 1}/{step[1]}",
            TAG_STEP_STARTED: f"{time.time():.3f}",
            TAG_NOTE: note,
        },
    )


def _wait(live: _Live, seconds: float) -> None:
    """Sleep while still reading the logs and watching for an abort."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        live.read()
        live.control()
        time.sleep(min(live.spec.live.read_interval_s, max(0.0, deadline - time.monotonic())))


def _run_live_step(live: _Live, step: CanaryStep, index: int, label: str) -> StepResult:
    """One step on live traffic; the terminal's heartbeat says the requests per arm meanwhile."""
    canary: list[Outcome] = []
    stable: list[Outcome] = []
    with heartbeat(lambda: f"live canary {label}: {arm_requests(len(canary), len(stable))}"):
        return _hold_live_step(live, step, index, label, canary, stable)


def _hold_live_step(
    live: _Live, step: CanaryStep, index: int, label: str, canary: list[Outcome], stable: list[Outcome]
) -> StepResult:
    spec = live.spec
    need = spec.min_requests(step)
    _set_step(live, step.share, "running", (index, len(spec.steps)), "window opening")
    registry.record_action(live.candidate, "canary_step", f"{label}: share {step.share:g}%", live.trigger)
    _wait(live, spec.live.settle_s)  # every replica routes the new share before the window opens
    opened = time.time()
    started = time.monotonic()
    extensions, paused_s, last_note = 0, 0.0, ""
    failing: tuple[CheckResult, ...] = ()
    while True:
        time.sleep(spec.live.read_interval_s)
        for ts, outcome in live.read():
            if ts >= opened:
                (canary if outcome.target == "canary" else stable).append(outcome)
        control = live.control()
        failing = live.analyzer.sequential_failure()
        if failing:  # safety never pauses: a clearly bad candidate is stopped even while held
            break
        rounds = 1 + extensions
        if control.state == "paused":
            paused_s += spec.live.read_interval_s
            note = f"paused by an operator at {label} ({len(canary)}/{need * rounds} canary requests)"
        else:
            elapsed = time.monotonic() - started - paused_s
            enough = len(canary) >= need * rounds
            timed = elapsed >= (step.duration_s or 0) * rounds
            if enough and timed:
                checks = live.analyzer.judge_window(canary, _reference(live, stable), need * rounds)
                verdict = combine(checks)
                if verdict != "inconclusive":
                    break
                if extensions >= spec.analysis.max_extensions:
                    verdict = "fail"
                    break
                extensions += 1
                note = f"{label} inconclusive: window extended ({extensions})"
            elif not enough:
                note = f"waiting for traffic: {len(canary)}/{need * rounds} canary requests"
                if elapsed > spec.live.max_wait_s * rounds:
                    if spec.live.on_no_traffic == "fail":
                        checks = (_no_traffic_check(len(canary), need * rounds, spec.live.max_wait_s),)
                        verdict = "fail"
                        break
                    note = f"held: {note} after {elapsed:.0f}s (on_no_traffic: hold)"
            else:
                note = f"{label}: {len(canary)} canary requests, window open {elapsed:.0f}s"
        if note != last_note:
            live.report(note)
            last_note = note
            _set_note(live, f"{note} | {_evidence(live.analyzer)}")
    if failing:
        checks = (*failing, *live.analyzer.window_checks(canary, _reference(live, stable)))
        verdict = "fail"
    live.stable_seen.extend(stable)
    result = StepResult(
        step.share,
        verdict,
        tuple(checks),
        window_stats(canary),
        window_stats(stable),
        extensions,
        time.monotonic() - started,
        bool(failing),
    )
    log_step(result)
    return result


def _reference(live: _Live, stable: list[Outcome]) -> list[Outcome]:
    """The step's stable window, or every stable outcome of the canary when the window has too few
    (the 100 % step has none: the earlier steps' live stable requests are the baseline)."""
    return stable if sum(o.ok for o in stable) >= MIN_STABLE_WINDOW else live.stable_seen + stable


def _evidence(analyzer: CanaryAnalyzer) -> str:
    """The sequential checks' evidence so far (e-values; a check fails at 1/level)."""
    return ", ".join(
        f"{c.name} e={c.evidence:.3g}" for c in analyzer.sequential_checks() if c.evidence is not None
    )


def watch_snapshot(model: str) -> dict:
    """What `lockgate canary watch` shows: the registry's rollout and the current step's live requests
    per arm, from every replica's log."""
    tags = registry.rollout_tags(model)
    rollout = registry.read_rollout(model)
    since = float(tags.get(TAG_STEP_STARTED, 0) or 0)
    versions = {"stable": rollout.stable, "canary": tags.get(TAG_CANDIDATE)}
    rows = live_store(model).read_rows(model, since=since) if since else []
    arms = {}
    for role, version in versions.items():
        arm = [r for r in rows if r.role == role and r.version == version]
        stats = window_stats([row_outcome(r) for r in arm])
        arms[role] = {
            "version": version,
            "requests": stats.requests,
            "errors": stats.errors,
            "failovers": sum(
                r.outcome == "failover" for r in rows if r.role == role and r.version == version
            ),
            "latency_p50_ms": stats.latency_p50_ms,
        }
    return {
        "model": model,
        "state": tags.get(TAG_STATE, ""),
        "step": tags.get(TAG_STEP, ""),
        "share": float(tags.get(TAG_SHARE, 0) or 0),
        "production": rollout.stable,
        "candidate": tags.get(TAG_CANDIDATE),
        "arms": arms,
        "routers": len(running_routers(model)),
        "note": tags.get(TAG_NOTE, ""),
        "approved_by": tags.get(TAG_APPROVED_BY),
    }


def _set_note(live: _Live, note: str) -> None:
    registry.set_rollout(live.candidate.name, {TAG_NOTE: note[:500]})


def _no_traffic_check(got: int, need: int, waited_s: float) -> CheckResult:
    message = f"waiting for traffic: {got}/{need} canary requests after {waited_s:g}s (on_no_traffic: fail)"
    return CheckResult("window", "fail", message, got, need, math.nan, math.nan)


def _await_approval(live: _Live, share: float, index: int, label: str) -> str:
    """Hold the previous share until an operator approves; the wait lives in the registry."""
    tags = registry.rollout_tags(live.candidate.name)
    if tags.get(TAG_STATE) != "awaiting_approval":
        step = (index, len(live.spec.steps))
        _set_step(live, share, "awaiting_approval", step, "waiting for `lockgate canary approve`")
        registry.record_action(live.candidate, "awaiting_approval", f"before {label}", live.trigger)
    live.report(f"waiting for approval before {label}: lockgate canary approve {live.candidate.name}")
    while True:
        control = live.control()
        if control.approved_by:
            return control.approved_by
        failing = live.analyzer.sequential_failure()
        if failing:
            raise _Failed(failing)
        live.read()
        time.sleep(live.spec.live.read_interval_s)


class _Failed(Exception):
    def __init__(self, checks: tuple[CheckResult, ...]) -> None:
        super().__init__("; ".join(f"{c.name}: {c.message}" for c in checks))
        self.checks = checks


def resume_index(candidate: ModelVersionRef, steps: int) -> int:
    """The step a restarted worker continues at: the one the registry holds for this candidate."""
    tags = registry.rollout_tags(candidate.name)
    if tags.get(TAG_CANDIDATE) != candidate.version or tags.get(TAG_STATE) in (None, "done", "aborting"):
        return 0
    try:
        return min(max(int(tags.get(TAG_STEP, "1/1").split("/")[0]) - 1, 0), steps - 1)
    except ValueError:
        return 0


def run_live_canary(
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    spec: CanarySpec,
    trigger: str,
    progress: Progress | None = None,
    store: LiveStore | None = None,
) -> CanaryResult:
    """Walk the spec's steps on live traffic; returns the verdict (not yet applied to the registry)."""
    report = progress or (lambda note: log.info("live canary: %s", note))
    start = resume_index(candidate, len(spec.steps))
    if start == 0:  # a fresh canary: no approval or abort of an earlier one applies
        registry.clear_rollout(candidate.name)
    live = _Live(
        stable,
        candidate,
        spec,
        (store or live_store(candidate.name)).tail(candidate.name, time.time()),
        CanaryAnalyzer.for_spec(spec),
        report,
        trigger,
    )
    if start:
        log.warning(
            "resuming the live canary of %s v%s at step %d", candidate.name, candidate.version, start + 1
        )
    results: list[StepResult] = []
    decision, reason = "promote", ""
    started = time.monotonic()
    try:
        for index, step in enumerate(spec.steps[start:], start=start):
            label = f"step {index + 1}/{len(spec.steps)} at {step.share:g}%"
            if spec.require_approval and index == len(spec.steps) - 1:
                previous = spec.steps[index - 1].share if index else 0.0
                approver = _await_approval(live, previous, index, label)
                report(f"approved by {approver}")
            result = _run_live_step(live, step, index, label)
            results.append(result)
            if result.verdict == "fail":
                decision, reason = "rollback", f"step {step.share:g}%: {'; '.join(result.reasons)}"
                break
        else:
            reason = f"all {len(results)} live steps passed"
    except Aborted as exc:
        decision, reason = "rollback", f"aborted by an operator: {exc}"
    except _Failed as exc:
        decision, reason = "rollback", f"while waiting for approval: {exc}"
    if decision == "rollback":
        # Users off the candidate first: routers drop the share at their next poll.
        registry.set_rollout(candidate.name, {TAG_SHARE: "0", TAG_STATE: "aborting"})
    details: dict[str, float | str] = {
        "traffic": "live",
        "client_requests": live.requests,
        "client_failed": live.failed,
        "failovers": live.failovers,
        "live_canary_requests": live.canary_requests,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    if live.first_canary_ts is not None:
        details["first_canary_request_to_decision_s"] = round(time.time() - live.first_canary_ts, 3)
    tags = registry.rollout_tags(candidate.name)
    if TAG_APPROVED_BY in tags:
        details["approved_by"] = tags[TAG_APPROVED_BY]
        details["approved_at"] = tags.get(TAG_APPROVED_AT, "")
    canary_total = sum(r.canary.requests for r in results)
    return CanaryResult(tuple(results), decision, reason, "canary", canary_total, details=details)


def finish_rollout(candidate: ModelVersionRef, result: CanaryResult, trigger: str) -> None:
    """After the decision was applied: routers back to Production only; the history says why."""
    registry.clear_rollout(candidate.name)
    registry.record_action(candidate, f"canary_{result.decision}", result.reason, trigger)


def with_reason(result: CanaryResult, why: str, mode: str = "live") -> CanaryResult:
    """The result with its traffic mode and why that mode ran (the release summary shows both)."""
    return replace(result, details={**result.details, "traffic": mode, "traffic_reason": why})


@task(name="canary-live")
def live_canary_task(
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    spec: CanarySpec,
    trigger: str,
    why: str,
    parent_run_id: str | None = None,
    lock: release_lock.LockRef | None = None,
) -> CanaryResult:
    """The release flow's live canary: steps on the users' traffic, decision applied, all in MLflow.
    Its progress notes are the release lock's phase (`lockgate canary status` shows them)."""
    import mlflow

    heartbeat = release_lock.Heartbeat(lock, get_settings().release_lock_ttl_s)

    with stage_run(parent_run_id, "canary", **{"lockgate.strategy": "canary", "lockgate.traffic": "live"}):
        mlflow.log_params(
            {
                "traffic": "live",
                "steps": ",".join(f"{s:g}" for s in spec.shares),
                "stable_version": stable.version,
                "candidate_version": candidate.version,
            }
        )
        result = live_canary(
            stable, candidate, spec, trigger, why, progress=lambda note: heartbeat(f"live: {note}")
        )
        for index, step in enumerate(result.steps):
            mlflow.log_metrics(
                {
                    "share": step.share,
                    "canary_requests": step.canary.requests,
                    "stable_requests": step.stable.requests,
                    "verdict_fail": float(step.verdict == "fail"),
                },
                step=index,
            )
        mlflow.log_dict(
            {"decision": result.decision, "reason": result.reason, "details": result.details}, "decision.json"
        )
        mlflow.set_tag("lockgate.decision", result.decision)
    return result


def live_canary(
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    spec: CanarySpec,
    trigger: str,
    why: str = "live canary",
    progress: Progress | None = None,
    store: LiveStore | None = None,
) -> CanaryResult:
    """Run a live canary and apply its decision (promote / roll back through the registry)."""
    registry.record_action(candidate, "canary_start", f"live canary vs v{stable.version}: {why}", trigger)
    result = with_reason(run_live_canary(stable, candidate, spec, trigger, progress, store), why)
    watch = result.decision == "promote" and spec.promote and spec.post_promotion.watch_minutes > 0
    if registry.describe_version(candidate).stage == "Archived":
        log.warning("%s v%s was already rolled back (operator abort)", candidate.name, candidate.version)
    elif watch:
        return promote_and_watch(stable, candidate, spec, trigger, result, progress, store)
    else:
        apply_decision(result, candidate, spec, trigger)
    finish_rollout(candidate, result, trigger)
    return result


def _begin_watch(previous: ModelVersionRef, promoted: ModelVersionRef, spec: CanarySpec) -> None:
    """Routers: ``100 - baseline_share`` % to the new version, the rest to the previous one. Set
    *before* the promotion (while the new version is still aliased ``canary``) and valid after it, so
    there is no moment in which every user goes to the new version with no baseline and no failover."""
    watch = spec.post_promotion
    registry.set_rollout(
        promoted.name,
        {
            TAG_CANDIDATE: promoted.version,
            TAG_BASELINE: previous.version,
            TAG_SHARE: f"{100 - watch.baseline_share:g}",
            TAG_STATE: "watching",
            TAG_STEP: "watch",
            TAG_STEP_STARTED: f"{time.time():.3f}",
            TAG_NOTE: f"watching v{promoted.version} vs v{previous.version} ({watch.watch_minutes:g} min)",
        },
    )


def promote_and_watch(
    previous: ModelVersionRef,
    candidate: ModelVersionRef,
    spec: CanarySpec,
    trigger: str,
    result: CanaryResult,
    progress: Progress | None = None,
    store: LiveStore | None = None,
) -> CanaryResult:
    """Promote with the previous version kept as a live baseline, then watch (see below)."""
    _begin_watch(previous, candidate, spec)
    apply_decision(result, candidate, spec, trigger)
    registry.record_action(candidate, "canary_promote", result.reason, trigger)
    return watch_after_promotion(previous, candidate, spec, trigger, result, progress, store)


def watch_after_promotion(
    previous: ModelVersionRef,
    promoted: ModelVersionRef,
    spec: CanarySpec,
    trigger: str,
    result: CanaryResult,
    progress: Progress | None = None,
    store: LiveStore | None = None,
) -> CanaryResult:
    """Judge the new Production against the previous version's live baseline for
    ``post_promotion.watch_minutes``: the routers keep the previous version loaded and send it
    ``baseline_share`` % of the users; a regression restores it to Production at once.

    The same analysis as a step (sequential checks on every request, window checks at the end), with
    the new Production as the "canary" arm and the previous version as "stable"."""
    watch = spec.post_promotion
    report = progress or (lambda note: log.info("post-promotion watch: %s", note))
    _begin_watch(previous, promoted, spec)
    registry.record_action(promoted, "watch_start", f"against v{previous.version}", trigger)
    live = _Live(
        previous,
        promoted,
        spec,
        (store or live_store(promoted.name)).tail(promoted.name, time.time()),
        CanaryAnalyzer.for_spec(spec),
        report,
        trigger,
    )
    _wait(live, spec.live.settle_s)
    opened = time.time()
    deadline = time.monotonic() + watch.watch_minutes * 60
    canary: list[Outcome] = []
    stable: list[Outcome] = []
    failing: tuple[CheckResult, ...] = ()
    try:
        while time.monotonic() < deadline and not failing:
            time.sleep(spec.live.read_interval_s)
            for ts, outcome in live.read():
                if ts >= opened:
                    (canary if outcome.target == "canary" else stable).append(outcome)
            live.control()
            failing = live.analyzer.sequential_failure()
        checks = failing or live.analyzer.judge_window(canary, stable, spec.min_canary_requests)
        verdict = "fail" if failing else combine(checks)
        why = "; ".join(f"{c.name}: {c.message}" for c in checks if c.verdict == "fail")
    except Aborted as exc:
        verdict, why, checks = "fail", f"aborted by an operator: {exc}", ()
    details = {
        **result.details,
        "watch_verdict": verdict,
        "watch_requests_new": len(canary),
        "watch_requests_previous": len(stable),
    }
    if verdict == "fail":
        reason = f"post-promotion watch: v{promoted.version} regressed against v{previous.version}: {why}"
        # Production back first: with the watch tags still set, routers then send everyone to the
        # previous version (the watched one is no longer Production), with no window on the bad one.
        registry.roll_back_production(promoted.name, reason, trigger, to_version=previous.version)
        registry.clear_rollout(promoted.name)
        registry.record_action(previous, "watch_rollback", reason, trigger)
        return replace(result, decision="rollback", reason=reason, details=details)
    registry.clear_rollout(promoted.name)
    note = f"post-promotion watch passed ({len(canary)} vs {len(stable)} requests)"
    registry.record_action(promoted, "watch_passed", note, trigger)
    return replace(result, reason=f"{result.reason}; {note}", details=details)


__all__ = [
    "Aborted",
    "Control",
    "choose_traffic",
    "finish_rollout",
    "live_canary",
    "live_canary_task",
    "live_dir",
    "live_store",
    "row_outcome",
    "run_live_canary",
    "running_routers",
    "watch_snapshot",
    "with_reason",
]
