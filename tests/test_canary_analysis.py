"""The canary analysis' statistics with known answers: e-value validity, early stopping, repeated looks,
effect sizes and verdicts (no servers; seeded simulations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from lockgate.flows.spec import CanarySpec, CanaryThresholds
from lockgate.tasks.release import analysis as ca
from lockgate.tasks.release.analysis import (
    CanaryAnalyzer,
    OneProportionEProcess,
    Outcome,
    TwoProportionEProcess,
    hodges_lehmann,
    interleave,
)
from lockgate.tasks.release.plan import TESTED_CHECKS


def _expected_block_factor(q_c: float, q_s: float, n_c: int, n_s: int, p_c: float, p_s: float) -> float:
    """E[block e-value] in closed form: each observation's factor averaged over its Bernoulli."""
    q0 = (n_c * q_c + n_s * q_s) / (n_c + n_s)
    u_c = p_c * q_c / q0 + (1 - p_c) * (1 - q_c) / (1 - q0)
    u_s = p_s * q_s / q0 + (1 - p_s) * (1 - q_s) / (1 - q0)
    return u_c**n_c * u_s**n_s


@pytest.mark.parametrize(("n_c", "n_s"), [(1, 1), (1, 19), (3, 2), (5, 95)])
def test_two_proportion_block_is_an_e_value_under_the_null(n_c: int, n_s: int) -> None:
    # For every alternative with q_c >= q_s and every null point p_c <= p_s: E <= 1.
    worst = 0.0
    for q_s in (0.001, 0.01, 0.2):
        for q_c in (q_s, q_s + 0.02, q_s + 0.3, 0.999):
            for p_s in (0.0, 0.01, 0.05, 0.5, 1.0):
                for p_c in np.linspace(0, p_s, 5):
                    worst = max(worst, _expected_block_factor(q_c, q_s, n_c, n_s, float(p_c), p_s))
    assert worst <= 1 + 1e-12
    # ... and above 1 where the canary really is worse (the test has power).
    assert _expected_block_factor(0.05, 0.01, n_c, n_s, 0.05, 0.01) > 1


def test_block_log_factor_matches_the_closed_form() -> None:
    # Averaging exp(log factor) over all outcomes of a (1, 2) block gives the closed form.
    q_c, q_s, p_c, p_s = 0.2, 0.05, 0.1, 0.1
    total = 0.0
    for x_c in (0, 1):
        for x_s in (0, 1, 2):
            prob = (p_c if x_c else 1 - p_c) * math.comb(2, x_s) * p_s**x_s * (1 - p_s) ** (2 - x_s)
            total += prob * math.exp(float(ca._block_log_factor(np.array([q_c]), q_s, x_c, 1, x_s, 2)[0]))
    assert total == pytest.approx(_expected_block_factor(q_c, q_s, 1, 2, p_c, p_s), rel=1e-12)


def test_one_proportion_factor_expectation_is_at_most_one_under_the_floor() -> None:
    process = OneProportionEProcess(0.05)
    for q in process.alternatives:
        for p in (0.0, 0.01, 0.05):
            expected = p * q / 0.05 + (1 - p) * (1 - q) / 0.95
            assert expected <= 1 + 1e-12


def _stream(p_canary: float, p_stable: float, share: float, canary_n: int, seed: int):
    rng = np.random.default_rng(seed)
    n = 0
    while n < canary_n:
        if rng.random() < share:
            n += 1
            yield "canary", bool(rng.random() < p_canary)
        else:
            yield "stable", bool(rng.random() < p_stable)


def test_repeated_looks_do_not_inflate_false_rollbacks() -> None:
    # 200 A/A streams (1 % errors, 25 % share), looked at after every request. A fixed one-sided z-test
    # at the same level, repeated at every look, fires far more often: the always-valid rule does not.
    level = 0.05
    z = norm.ppf(1 - level)
    sequential_alarms = naive_alarms = 0
    for seed in range(200):
        process = TwoProportionEProcess(tolerance=0.0)
        naive = False
        counts = {"canary": [0, 0], "stable": [0, 0]}
        for target, error in _stream(0.01, 0.01, 0.25, 300, seed):
            process.add(target, error)
            counts[target][0] += error
            counts[target][1] += 1
            (x_c, n_c), (x_s, n_s) = counts["canary"], counts["stable"]
            if n_c >= 10 and n_s >= 10 and not naive:
                pooled = (x_c + x_s) / (n_c + n_s)
                se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_s)) if 0 < pooled < 1 else 0
                naive = se > 0 and (x_c / n_c - x_s / n_s) / se > z
        sequential_alarms += process.mixture.max_evidence >= 1 / level
        naive_alarms += naive
    assert sequential_alarms / 200 <= level
    assert naive_alarms > 3 * sequential_alarms
    assert naive_alarms / 200 > 0.1


def test_clearly_bad_canary_is_stopped_within_a_few_requests() -> None:
    spec = CanarySpec()
    stops = []
    for seed in range(20):
        analyzer = CanaryAnalyzer.for_spec(spec)
        for target, error in _stream(0.5, 0.01, 0.05, 200, seed):
            analyzer.observe(Outcome(target, not error, 10.0, 500 if error else 200))
            if analyzer.sequential_failure():
                break
        stops.append(analyzer.errors.trials["canary"])
    assert np.median(stops) <= 15
    assert max(stops) < 200


def test_an_identical_canary_passes_and_the_level_is_split_over_checks_and_looks() -> None:
    spec = CanarySpec(steps=(10, 100), analysis={"alpha": 0.06, "max_extensions": 2})
    analyzer = CanaryAnalyzer.for_spec(spec)
    assert len(ca.TESTED_CHECKS) == TESTED_CHECKS  # the plan's copy of the count stays in step
    assert analyzer.check_level == pytest.approx(0.01)
    assert analyzer.look_level == pytest.approx(0.01 / (2 * 3))
    rng = np.random.default_rng(7)
    canary = [
        Outcome("canary", True, 20 * math.exp(0.2 * rng.standard_normal()), 200, 6, False) for _ in range(60)
    ]
    stable = [
        Outcome("stable", True, 20 * math.exp(0.2 * rng.standard_normal()), 200, 6, False) for _ in range(540)
    ]
    analyzer.observe_all(interleave(canary, stable))
    checks = analyzer.judge_window(canary, stable, 50)
    assert ca.combine(checks) == "pass", [c.message for c in checks]
    assert {c.name for c in checks} == {
        "window",
        "error_rate",
        "success_floor",
        "empty_rate",
        "latency",
        "output_tokens",
    }


def _latencies(target: str, n: int, factor: float, seed: int) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    return [
        Outcome(target, True, 30 * factor * math.exp(0.25 * rng.standard_normal()), 200, 6, False)
        for _ in range(n)
    ]


def test_latency_needs_significance_and_a_minimum_effect() -> None:
    spec = CanarySpec(steps=(100,))
    analyzer = CanaryAnalyzer.for_spec(spec)
    stable = _latencies("stable", 4000, 1.0, 1)
    # 2x slower: significant and far beyond x1.2.
    slow = analyzer.window_checks(_latencies("canary", 40, 2.0, 2), stable)[0]
    assert (slow.name, slow.verdict) == ("latency", "fail")
    assert slow.observed == pytest.approx(2.0, rel=0.15)
    # 5 % slower on 4000 requests: significant, but below the minimum effect: passes.
    small = analyzer.window_checks(_latencies("canary", 4000, 1.05, 3), stable)[0]
    assert small.p_value < small.level and small.verdict == "pass"
    # 30 % slower on 6 requests (allowed to be judged): beyond the effect, not significant at the split
    # level yet: inconclusive.
    few_allowed = CanaryAnalyzer.for_spec(CanarySpec(steps=(100,), analysis={"min_latency_requests": 5}))
    thin = few_allowed.window_checks(_latencies("canary", 6, 1.3, 4), stable)[0]
    assert thin.observed > 1.2 and thin.verdict == "inconclusive"


def test_shorter_answers_and_empty_answers_are_flagged() -> None:
    spec = CanarySpec(steps=(100,), thresholds=CanaryThresholds(max_output_tokens_change=0.3))
    analyzer = CanaryAnalyzer.for_spec(spec)
    stable = [Outcome("stable", True, 20.0, 200, 6, False) for _ in range(200)]
    short = [Outcome("canary", True, 20.0, 200, 2, False) for _ in range(40)]
    length = analyzer.window_checks(short, stable)[1]
    assert (length.name, length.verdict) == ("output_tokens", "fail")
    assert length.observed == pytest.approx(2 / 6 - 1)

    empty = [Outcome("canary", True, 20.0, 200, 0, True) for _ in range(40)]
    analyzer.observe_all(interleave(empty, stable))
    failing = analyzer.sequential_failure()
    assert [c.name for c in failing] == ["empty_rate"]
    assert "canary empty answers 1.000 vs stable 0.000" in failing[0].message


def test_hodges_lehmann_and_interleave_known_answers() -> None:
    assert hodges_lehmann([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == 3.0
    canary = [Outcome("canary", True, 1.0, 200)] * 2
    stable = [Outcome("stable", True, 1.0, 200)] * 6
    # One canary in four, each as soon as it is due: positions 3 and 7.
    merged = "".join(o.target[0] for o in interleave(canary, stable))
    assert merged == "sscssscs"


def test_a_step_with_too_few_canary_requests_is_inconclusive_not_passed() -> None:
    spec = CanarySpec(min_canary_requests=10)
    analyzer = CanaryAnalyzer.for_spec(spec)
    checks = analyzer.judge_window(
        [Outcome("canary", True, 5.0, 200)] * 3, [Outcome("stable", True, 5.0, 200)] * 50, 10
    )
    assert ca.combine(checks) == "inconclusive"
    assert checks[0].message == "only 3 canary requests (< min_requests 10)"
