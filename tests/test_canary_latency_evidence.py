"""The canary's latency verdict: enough requests per arm before judging, the evidence in the reason, and
``compress.allow_slower_quantized`` carried over (issue 18: identical weights were rolled back at x1.62
on 5 canary vs 23 stable requests, and promoted the next run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import tiny_release_spec
from lockgate.flows.spec import CanarySpec, PipelineSpec
from lockgate.tasks.release.analysis import Outcome, Target
from lockgate.tasks.release.canary_strategy import judge_step, run_steps


def _arm(target: Target, n: int, latency_ms: float) -> list[Outcome]:
    # A little spread, no overlap between the arms: the slower arm is slower in every request.
    return [Outcome(target, True, latency_ms * (1 + (i % 5) / 100), 200, 6, False) for i in range(n)]


def _latency(step_checks: tuple) -> object:
    return next(c for c in step_checks if c.name == "latency")


def test_a_handful_of_requests_does_not_judge_latency() -> None:
    spec = CanarySpec()  # default plan and analysis
    step = judge_step(5, _arm("canary", 5, 162.0), _arm("stable", 23, 100.0), spec)
    latency = _latency(step.checks)
    assert step.verdict == "pass", step.reasons
    assert "latency not judged: 5 canary, 23 stable successful requests" in latency.message
    assert "analysis.min_latency_requests: 20 per arm" in latency.message
    assert math.isnan(latency.p_value) and (latency.n_canary, latency.n_stable) == (5, 23)


def test_enough_requests_per_arm_still_judge_a_slower_canary() -> None:
    spec = CanarySpec()
    step = judge_step(50, _arm("canary", 40, 162.0), _arm("stable", 40, 100.0), spec)
    latency = _latency(step.checks)
    assert latency.verdict == "fail" and latency.observed == pytest.approx(1.62, rel=0.05)
    assert latency.p_value < latency.level


def test_the_decision_says_how_much_latency_evidence_it_had() -> None:
    spec = CanarySpec(steps=(10, 100), min_canary_requests=30, users=97)

    def sender(target: Target, prompt: str, user_id: str) -> Outcome:
        return Outcome(target, True, 20.0 + len(user_id) % 7, 200, 4, False)

    result = run_steps(sender, ["a", "b"], spec, verbose=False)
    assert result.decision == "promote"
    # The 10 % step has 30 canary requests but the 100 % step compares against mirrored stable: both
    # arms are large enough to judge.
    assert "latency judged at 10%, 100% on" in result.reason, result.reason
    thin = CanarySpec(steps=(10, 100), min_canary_requests=5, users=97)
    result = run_steps(sender, ["a", "b"], thin, verbose=False)
    assert "not judged at 10%, 100% (too few requests per arm)" in result.reason, result.reason


def _pipeline(compress_allows: bool, canary: dict) -> PipelineSpec:
    raw = tiny_release_spec(Path("/nonexistent"), "p", "e", canary)["pipelines"]["tiny"]
    raw["compress"]["allow_slower_quantized"] = compress_allows
    return PipelineSpec.model_validate(raw)


def test_allow_slower_quantized_carries_over_to_the_canary() -> None:
    made_for_size = _pipeline(True, {}).canary
    assert made_for_size.thresholds.allow_slower_candidate is True
    step = judge_step(50, _arm("canary", 40, 162.0), _arm("stable", 40, 100.0), made_for_size)
    latency = _latency(step.checks)
    assert step.verdict == "pass" and latency.verdict == "pass", step.reasons
    assert latency.observed == pytest.approx(1.62, rel=0.05)  # still measured and reported
    assert "slower allowed" in latency.message
    # Not made for size: enforced; an explicit canary setting wins over the compress one.
    assert _pipeline(False, {}).canary.thresholds.allow_slower_candidate is False
    explicit = _pipeline(True, {"thresholds": {"allow_slower_candidate": False}}).canary
    assert explicit.thresholds.allow_slower_candidate is False
    enforced = judge_step(50, _arm("canary", 40, 162.0), _arm("stable", 40, 100.0), explicit)
    assert enforced.verdict == "fail"
