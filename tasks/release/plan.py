"""What a release strategy will take, derived from the spec alone, before anything runs (`lockgate plan`).

Per canary step the window needs ``min_requests`` canary requests — about ``min_requests · 100 / share``
requests in all — and lasts ``duration_s``; it is cut at ``max_requests_per_step`` requests (then judged
short of data: inconclusive). Times follow from ``traffic_per_s``; without it only durations are known.

* **minimum promotion time**: every step passes at its first look (the sum of the step windows);
* **worst-case rollback time**: the longest a canary that turns bad keeps serving its share — the
  longest step with every extension used (the sequential error checks usually stop it much earlier),
  plus the switch back (the service re-reads the registry within its poll interval);
* **worst-case time to a decision**: every step uses every extension.

Pure arithmetic on the spec: imports nothing heavy, so the CLI answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec

#: The LLM service re-reads a floating registry URI every 2 s by default (LOCKGATE_REGISTRY_POLL_S).
SERVICE_POLL_S = 2.0
TESTED_CHECKS = 6  # tasks/canary_analysis.TESTED_CHECKS, without importing numpy for a count


@dataclass(frozen=True)
class PlannedStep:
    name: str
    share: float
    min_canary_requests: int
    duration_s: float | None
    expected_requests: float  # requests in all (both versions) one window needs
    cut_short: bool  # the request cap comes first: the window is judged short of data
    min_time_s: float | None  # first look passes; None when no rate and no duration is known
    max_time_s: float | None  # every extension used


@dataclass(frozen=True)
class ReleasePlan:
    strategy: str
    steps: tuple[PlannedStep, ...]
    traffic_per_s: float | None
    max_extensions: int
    canary_requests_min: int
    min_promotion_s: float | None
    worst_case_rollback_s: float | None
    worst_case_decision_s: float | None
    alpha: float
    alpha_per_check: float
    alpha_per_look: float
    notes: tuple[str, ...]


def _sum(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _window_time(requests: float, cap: float, duration: float | None, rate: float | None) -> float | None:
    """One round of a window: until enough requests and the duration, but at most the cap."""
    if rate is None:
        return duration
    return min(cap / rate, max(requests / rate, duration or 0.0))


def plan_release(spec: CanarySpec) -> ReleasePlan:
    rate = spec.traffic_per_s
    rounds = 1 + spec.analysis.max_extensions
    notes: list[str] = []
    steps: list[PlannedStep] = []
    if spec.strategy == "canary":
        for step in spec.steps:
            need = spec.min_requests(step)
            # At 100 % each request is mirrored to stable (the concurrent baseline): twice the requests.
            expected = need * 100 / step.share if step.share < 100 else 2 * need
            cap = spec.max_requests_per_step
            cut = expected > cap
            if cut:
                notes.append(
                    f"step {step.share:g}%: ~{expected:.0f} requests needed for {need} canary requests but "
                    f"max_requests_per_step is {cap}: the window will often be inconclusive"
                )
            if rate is not None and step.duration_s is not None and step.duration_s * rate > cap:
                notes.append(
                    f"step {step.share:g}%: duration_s {step.duration_s:g} at {rate:g} req/s exceeds "
                    f"max_requests_per_step {cap}: the window is cut before its duration"
                )
            once = _window_time(expected, cap, step.duration_s, rate)
            steps.append(
                PlannedStep(
                    f"{step.share:g}%",
                    step.share,
                    need,
                    step.duration_s,
                    min(expected, cap),
                    cut,
                    once,
                    None if once is None else once * rounds,
                )
            )
        canary_min = sum(s.min_canary_requests for s in steps)
        longest = [s.max_time_s for s in steps]
        worst_rollback = (
            None if None in longest else max(v for v in longest if v is not None) + SERVICE_POLL_S
        )
    elif spec.strategy == "blue_green":
        bg = spec.blue_green
        smoke = _window_time(bg.pre_switch_requests, bg.pre_switch_requests, None, rate)
        base = _window_time(bg.baseline_requests, bg.baseline_requests, None, rate)
        bake = _window_time(bg.bake_requests, float("inf"), bg.bake_s, rate) if rate else bg.bake_s
        steps = [
            PlannedStep(
                "smoke (green)", 0, bg.pre_switch_requests, None, bg.pre_switch_requests, False, smoke, smoke
            ),
            PlannedStep("baseline (blue)", 0, 0, None, bg.baseline_requests, False, base, base),
            PlannedStep("switch", 100, 0, None, 0, False, 0.0, bg.switch_timeout_s),
            PlannedStep(
                "bake", 100, bg.bake_requests, bg.bake_s, bg.bake_requests, False, bake, bake * rounds
            ),
        ]
        canary_min = bg.bake_requests
        # Users are on the new version from the switch until the switch back has been served.
        worst_rollback = bg.switch_timeout_s + bake * rounds + bg.switch_timeout_s
        if rate is None:
            notes.append("no traffic_per_s: smoke and baseline times unknown (bake is at least bake_s)")
    else:
        sh = spec.shadow
        once = _window_time(sh.requests, float("inf"), None, rate)
        steps = [
            PlannedStep(
                "shadow (mirrored)",
                100,
                sh.requests,
                None,
                sh.requests,
                False,
                once,
                None if once is None else once * rounds,
            )
        ]
        canary_min = sh.requests
        worst_rollback = 0.0  # users never get the candidate's answers
        notes.append("shadow: users only ever get stable's answers, so nothing reaches them to roll back")
    if spec.strategy != "blue_green" and rate is None and any(s.duration_s is None for s in steps):
        notes.append("set traffic_per_s (or duration_s per step) to turn request counts into times")
    per_check = spec.analysis.alpha / TESTED_CHECKS
    looks = (len(spec.steps) if spec.strategy == "canary" else 1) * rounds
    return ReleasePlan(
        spec.strategy,
        tuple(steps),
        rate,
        spec.analysis.max_extensions,
        canary_min,
        _sum([s.min_time_s for s in steps if s.name != "switch"]),
        worst_rollback,
        _sum([s.max_time_s for s in steps]),
        spec.analysis.alpha,
        per_check,
        per_check / looks,
        tuple(notes),
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def render_plan(pipeline: str, plan: ReleasePlan) -> str:
    """The plan as the CLI prints it."""
    rate = f"{plan.traffic_per_s:g} req/s" if plan.traffic_per_s else "as fast as answered"
    lines = [
        f"plan {pipeline}: strategy {plan.strategy}, traffic {rate}, up to {plan.max_extensions} "
        "extension(s) per inconclusive step",
        f"{'step':<18} {'canary req':>10} {'duration':>9} {'requests':>9} {'min time':>9} {'max time':>9}",
    ]
    for s in plan.steps:
        lines.append(
            f"{s.name:<18} {s.min_canary_requests:>10} {_duration(s.duration_s):>9} "
            f"{s.expected_requests:>9.0f}{'*' if s.cut_short else ' '}{_duration(s.min_time_s):>9} "
            f"{_duration(s.max_time_s):>9}"
        )
    lines += [
        f"canary requests (at least)    {plan.canary_requests_min}",
        f"minimum promotion time        {_duration(plan.min_promotion_s)}",
        f"worst-case rollback time      {_duration(plan.worst_case_rollback_s)}"
        "  (longest exposure of a bad version before the switch back is served)",
        f"worst-case time to a decision {_duration(plan.worst_case_decision_s)}",
        f"false-rollback budget         {plan.alpha:g} (per check {plan.alpha_per_check:.3g}, "
        f"per window test and look {plan.alpha_per_look:.2g})",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
