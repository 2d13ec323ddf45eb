"""Sticky routing and the per-step judge, with known answers (no servers needed)."""

from __future__ import annotations

import math

from lockgate.flows.spec import CanarySpec, CanaryThresholds
from lockgate.tasks.release.analysis import Outcome
from lockgate.tasks.release.canary_strategy import judge_step, route, user_bucket


def test_buckets_are_stable_and_uniform() -> None:
    assert user_bucket("alice") == user_bucket("alice")
    buckets = [user_bucket(f"user-{i}") for i in range(10_000)]
    assert all(0 <= b < 100 for b in buckets)
    share_below_10 = sum(b < 10 for b in buckets) / len(buckets)
    assert 0.09 < share_below_10 < 0.11


def test_canary_users_only_grow_as_share_grows() -> None:
    users = [f"user-{i}" for i in range(2000)]
    previous: set[str] = set()
    for share in (2, 4, 8, 16, 32, 64, 100):
        on_canary = {u for u in users if route(u, share) == "canary"}
        assert previous <= on_canary
        previous = on_canary
    assert previous == set(users)


def _outcomes(target: str, n: int, errors: int, latency: float) -> list[Outcome]:
    return [
        Outcome(
            target, i >= errors, latency + i % 3, 200 if i >= errors else 500, output_tokens=6, empty=False
        )
        for i in range(n)
    ]


def test_judge_passes_healthy_canary() -> None:
    spec = CanarySpec(min_canary_requests=10)
    step = judge_step(10, _outcomes("canary", 25, 0, 20.0), _outcomes("stable", 90, 0, 20.0), spec)
    assert step.passed and step.reasons == ()
    assert step.latency_p_value > 0.05


def test_judge_fails_on_errors_latency_and_holds_on_too_few_requests() -> None:
    spec = CanarySpec(min_canary_requests=10, thresholds=CanaryThresholds(max_latency_p95_ratio=1.5))
    failing = judge_step(5, _outcomes("canary", 10, 3, 20.0), _outcomes("stable", 90, 0, 20.0), spec)
    assert failing.verdict == "fail"
    assert any("success rate 0.700 < 0.95" in r for r in failing.reasons)
    assert any(r.startswith("error_rate: canary error rate 0.300") for r in failing.reasons)
    slow = judge_step(5, _outcomes("canary", 25, 0, 80.0), _outcomes("stable", 90, 0, 20.0), spec)
    assert slow.verdict == "fail" and any(r.startswith("latency: latency x3.") for r in slow.reasons)
    # Too few canary requests is not a failure of the canary: the step is held (inconclusive).
    thin = judge_step(5, _outcomes("canary", 3, 0, 20.0), _outcomes("stable", 90, 0, 20.0), spec)
    assert thin.verdict == "inconclusive" and not thin.passed
    assert thin.reasons == ("window: only 3 canary requests (< min_requests 10)",)
    assert math.isnan(judge_step(5, [], [], spec).latency_p_value)


def test_one_error_in_a_small_window_is_no_evidence() -> None:
    # 1 error in 10 canary requests vs none in 90 stable: above the 0.02 tolerance, but far from
    # significant: a fixed threshold on the point estimate would roll back a healthy canary here.
    spec = CanarySpec(min_canary_requests=10)
    step = judge_step(10, _outcomes("canary", 10, 1, 20.0), _outcomes("stable", 90, 0, 20.0), spec)
    assert step.verdict == "pass", step.reasons
