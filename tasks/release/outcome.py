"""What every release strategy returns: the judged steps and the decision.

The ground floor of the strategies: tasks/canary.py (the stage) and each strategy module
(tasks/release/canary_strategy.py, blue_green.py, shadow.py) import these types from here, so no
strategy imports the stage that dispatches to it. A verdict becomes a registry transition here too
(:func:`apply_decision`), for the stage and the live canary alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.release.analysis import CheckResult, Verdict, WindowStats

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec
    from lockgate.tasks.platform.model_registry import ModelVersionRef

log = get_logger(__name__)

StrategyName = Literal["canary", "blue_green", "shadow"]
Progress = Callable[[str], None]
"""Called with a phase label as a strategy goes (the release lock's heartbeat)."""


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
    strategy: StrategyName = "canary"
    canary_requests: int = 0
    report: str | None = None  # the shadow report's path
    details: dict[str, float | str] = field(default_factory=dict)


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


def latency_evidence(steps: tuple[StepResult, ...] | list[StepResult]) -> str:
    """How much evidence the latency verdict had: the steps whose latency was judged (and on how many
    requests per arm) and those with too few requests to judge. Part of every decision's reason."""
    judged = [(s, c) for s in steps for c in s.checks if c.name == "latency" and not math.isnan(c.p_value)]
    skipped = [s for s in steps for c in s.checks if c.name == "latency" and math.isnan(c.p_value)]
    if not judged and not skipped:
        return "latency not compared"
    parts = []
    if judged:
        canary = sum(c.n_canary for _, c in judged)
        stable = sum(c.n_stable for _, c in judged)
        shares = ", ".join(f"{s.share:g}%" for s, _ in judged)
        parts.append(f"latency judged at {shares} on {canary} canary / {stable} stable requests")
    if skipped:
        shares = ", ".join(f"{s.share:g}%" for s in skipped)
        parts.append(f"not judged at {shares} (too few requests per arm)")
    return "; ".join(parts)


def apply_decision(result: CanaryResult, candidate: ModelVersionRef, spec: CanarySpec, trigger: str) -> None:
    """The registry transition a canary or shadow verdict calls for (blue-green switches itself)."""
    if result.decision == "rollback":
        registry.roll_back_candidate(candidate, result.reason, trigger)
    elif spec.promote:
        registry.promote(candidate, result.reason, trigger)
    else:
        registry.mark_canary_passed(candidate, result.reason, trigger)
