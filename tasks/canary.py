"""Stage 6: release the staged candidate by the spec's strategy — canary (default), blue-green or shadow.

The stage serves nothing itself: it opens the canary's MLflow run, dispatches to the strategy named by
``canary.strategy`` through :data:`STRATEGIES` (each one module under tasks/release/ with the entry
point ``release(run: ReleaseRun) -> CanaryResult``), records the decision (per-step metrics with every
test statistic, ``decision.json``, tags), applies it as a registry transition
(tasks/platform/model_registry.py) unless the strategy switches the registry itself (blue-green), and
removes the persisted canary state once decided.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.platform.settings import get_settings
from lockgate.tasks.platform.tracking import stage_run
from lockgate.tasks.release import blue_green, canary_strategy, shadow
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.outcome import CanaryResult, StrategyName, apply_decision
from lockgate.tasks.release.state import CanaryState, clear_state
from lockgate.tasks.release.strategy import ReleaseRun, Strategy

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec

__all__ = ["STRATEGIES", "canary_task", "release_outcome", "resume_canary"]

log = get_logger(__name__)


@dataclass(frozen=True)
class StrategyEntry:
    release: Strategy
    switches_registry: bool  # applies its own registry transitions (the stage must not apply them again)


#: ``canary.strategy`` → its entry point.
STRATEGIES: dict[StrategyName, StrategyEntry] = {
    "canary": StrategyEntry(canary_strategy.release, switches_registry=False),
    "blue_green": StrategyEntry(blue_green.release, switches_registry=True),
    "shadow": StrategyEntry(shadow.release, switches_registry=False),
}


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
    log.warning(
        "resuming the canary of %s v%s after %d of %d completed step(s)",
        state.candidate.name,
        state.candidate.version,
        len(state.checkpoint.steps),
        len(spec.steps),
    )
    return canary_task(state, spec, trigger, lock, resumed_in_run=parent_run_id)


@task(name="canary")
def canary_task(
    state: CanaryState,
    spec: CanarySpec,
    trigger: str,
    lock: release_lock.LockRef | None = None,
    resumed_in_run: str | None = None,
) -> CanaryResult:
    """Release ``state``'s candidate by the spec's strategy, record the decision and apply it.

    ``state`` is a fresh :meth:`CanaryState.start` or a persisted one being resumed; then
    ``resumed_in_run`` is the restarted release's MLflow run (the canary's run goes under it, tagged
    with the run it resumes). Services are stopped whatever happens; ``lock`` (the release lock) is
    renewed as the release goes and records the services, so a killed release can be cleaned up."""
    import mlflow

    stable, candidate = state.stable, state.candidate
    strategy = STRATEGIES[spec.strategy]
    heartbeat = release_lock.Heartbeat(lock, get_settings().release_lock_ttl_s)
    parent_run_id = resumed_in_run if resumed_in_run is not None else state.mlflow_run_id
    resumed = (
        {
            "lockgate.canary.resumed_from_run": state.mlflow_run_id or "",
            "lockgate.canary.resumed_after_steps": str(len(state.checkpoint.steps)),
        }
        if resumed_in_run is not None
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
        run = ReleaseRun(state, spec, trigger, heartbeat)
        result = strategy.release(run)
        # Which engine each service ran and why (a candidate vLLM cannot load runs on transformers).
        engines = {f"engine_{role}": text for role, text in run.engines.items()}
        result = replace(result, details={**result.details, **engines})
        _log_results(result)
        mlflow.log_dict(_decision_record(result, stable, candidate), "decision.json")
        if result.report:
            mlflow.log_artifact(result.report, spec.strategy)
            html = Path(result.report).with_suffix(".html")
            if html.is_file():
                mlflow.log_artifact(str(html), spec.strategy)
        mlflow.set_tag("lockgate.decision", result.decision)
        heartbeat(f"{spec.strategy}: applying decision {result.decision}")
        if not strategy.switches_registry:
            apply_decision(result, candidate, spec, trigger)
        clear_state(candidate.name)  # decided: nothing left to resume
    return result


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
