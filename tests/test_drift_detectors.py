"""Known-answer tests for tasks.drift_detectors (chapter 9.4).

ADWIN is river's: its tests check the setting ConceptDriftMonitor runs it with; the statistical tests
are checked against values computed by hand from their formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lockgate.tasks.monitoring.detectors import (
    ConceptDriftMonitor,
    FeatureDriftMonitor,
    MultiScaleDriftDetector,
    TextQualityMonitor,
    calibration_error,
    classify_change,
    drift_severity,
    kl_divergence,
    ks_two_sample,
    mann_kendall,
    population_stability_index,
    quantile_bin_edges,
    text_quality,
)


# ------------------------------------------------------------------------------------- ADWIN (river's)
# ADWIN is river's (``river.drift.ADWIN``); these tests check the setting ConceptDriftMonitor runs it with.
def _bernoulli_jump(seed: int, n_before: int = 4000, n_after: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random(n_before) < 0.05, rng.random(n_after) < 0.20]).astype(np.float64)


def _feed_errors(monitor: ConceptDriftMonitor, errors: np.ndarray) -> list[int]:
    """Feed a 0/1 error stream as labelled predictions; the indices where ADWIN alarmed."""
    return [i for i, e in enumerate(errors.tolist()) if monitor.update(int(e), 0).adwin_alarm]


def test_adwin_detects_error_rate_jump_quickly() -> None:
    # 5 % → 20 % error rate at index 4000, at the monitor's delta: detected after the change, with a
    # median delay of at most 200 items.
    delays = []
    for seed in range(30):
        alarms = _feed_errors(ConceptDriftMonitor(), _bernoulli_jump(100 + seed))
        assert alarms, f"seed {seed}: change missed"
        assert alarms[0] >= 4000, f"seed {seed}: false alarm at {alarms[0]}"
        delays.append(alarms[0] - 4000)
    assert max(delays) < 600
    assert float(np.median(delays)) <= 200


def test_adwin_no_false_alarm_on_stationary_stream() -> None:
    # delta = 1e-4 (the monitor's default) raised no false alarm over 10^6 stationary items in the benchmark.
    rng = np.random.default_rng(7)
    monitor = ConceptDriftMonitor()
    errors = (rng.random(300_000) < 0.05).astype(np.float64)
    assert _feed_errors(monitor, errors) == []
    assert abs(monitor.update(0, 0).error_rate - 0.05) < 0.003


def test_concept_drift_monitor_rejects_a_bad_delta() -> None:
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError, match="delta"):
            ConceptDriftMonitor(delta=delta)


# ------------------------------------------------------------------------------------- KS / KL / PSI
def test_ks_disjoint_samples_exact_p_value() -> None:
    result = ks_two_sample([1, 2, 3, 4], [5, 6, 7, 8])
    assert result.statistic == 1.0
    # Exact null: only the 2 of C(8,4) = 70 arrangements with all of one sample first give D = 1.
    assert result.p_value == pytest.approx(2 / 70)
    assert result.drifted


def test_ks_statistic_by_hand() -> None:
    # ECDFs at x = 2: F_ref = 2/5, F_cur = 0 → D = 0.4 (no larger gap anywhere).
    result = ks_two_sample([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    assert result.statistic == pytest.approx(0.4)
    assert not result.drifted


def test_ks_same_distribution_not_drifted() -> None:
    rng = np.random.default_rng(0)
    assert not ks_two_sample(rng.normal(size=2000), rng.normal(size=2000)).drifted
    assert ks_two_sample(rng.normal(size=2000), rng.normal(0.3, 1, size=2000)).drifted


def test_kl_divergence_by_hand() -> None:
    # P = (1/2, 1/2), Q = (1/4, 3/4): ½·ln 2 + ½·ln(2/3) = ½·ln(4/3)
    assert kl_divergence([1, 1], [1, 3], eps=0.0) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl_divergence([5, 5], [2, 6], eps=0.0) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl_divergence([3, 1, 0], [3, 1, 0], eps=0.0) == 0.0
    assert kl_divergence([1, 1], [1, 0], eps=0.0) == math.inf
    assert math.isfinite(kl_divergence([1, 1], [1, 0]))  # smoothed by eps


@pytest.mark.parametrize(
    ("p", "q", "match"),
    [([1, -1], [1, 1], "p_counts"), ([0, 0], [1, 1], "p_counts"), ([1, 1], [1, 1, 1], "same length")],
)
def test_kl_divergence_rejects_bad_counts(p: list[int], q: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kl_divergence(p, q)


def test_psi_by_hand_on_quantile_bins() -> None:
    reference = np.arange(100.0)
    assert quantile_bin_edges(reference, 4).tolist() == [24.75, 49.5, 74.25]
    # current: 10 % / 20 % / 30 % / 40 % in the four reference quartile bins
    current = np.concatenate([np.full(10, 5.0), np.full(20, 30.0), np.full(30, 60.0), np.full(40, 90.0)])
    expected = sum((c - 0.25) * math.log(c / 0.25) for c in (0.1, 0.2, 0.3, 0.4))
    result = population_stability_index(reference, current, bins=4, eps=0.0)
    assert result.psi == pytest.approx(expected, rel=1e-12)
    assert result.psi == pytest.approx(0.2282, abs=1e-4)
    assert result.level == "moderate" and not result.drifted
    assert result.reference_fractions == (0.25, 0.25, 0.25, 0.25)
    assert result.current_fractions == (0.1, 0.2, 0.3, 0.4)


def test_psi_levels() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=5000)
    assert population_stability_index(reference, rng.normal(size=5000)).level == "stable"
    far = population_stability_index(reference, rng.normal(3.0, 1.0, size=5000))
    assert far.level == "significant" and far.drifted and math.isfinite(far.psi)


def test_psi_rejects_bad_bins() -> None:
    with pytest.raises(ValueError, match="bins"):
        population_stability_index([1.0, 2.0, 3.0], [1.0, 2.0], bins=1)


# ------------------------------------------------------------------------------------------ Mann-Kendall
def test_mann_kendall_monotone_by_hand() -> None:
    result = mann_kendall([1, 2, 3, 4, 5])
    assert result.s == 10  # all C(5,2) pairs increase
    assert result.variance == pytest.approx(5 * 4 * 15 / 18)
    assert result.z == pytest.approx(9 / math.sqrt(50 / 3))
    assert result.p_value == pytest.approx(math.erfc(result.z / math.sqrt(2)))
    assert result.p_value == pytest.approx(0.02749, abs=1e-5)
    assert result.tau == 1.0
    assert result.trend == "increasing"
    assert mann_kendall(np.arange(50.0)[::-1]).trend == "decreasing"


def test_mann_kendall_tie_correction_by_hand() -> None:
    result = mann_kendall([1, 1, 2])
    assert result.s == 2  # pairs: (1,1) → 0, (1,2) → +1, (1,2) → +1
    assert result.variance == pytest.approx((3 * 2 * 11 - 2 * 1 * 9) / 18)  # one tie group of size 2
    assert result.z == pytest.approx(1 / math.sqrt(8 / 3))
    assert mann_kendall([4.0, 4.0, 4.0]).p_value == 1.0


def test_mann_kendall_noise_has_no_trend() -> None:
    rng = np.random.default_rng(3)
    result = mann_kendall(rng.normal(size=300))
    assert result.trend == "none" and result.p_value > 0.05
    trend = mann_kendall(rng.normal(size=300) + np.linspace(0, 1, 300))
    assert trend.trend == "increasing"


def test_mann_kendall_needs_three_values() -> None:
    with pytest.raises(ValueError, match="values"):
        mann_kendall([1.0, 2.0])


# ------------------------------------------------------------------------------------- feature monitor
def test_feature_monitor_z_score_by_hand() -> None:
    monitor = FeatureDriftMonitor({"x": [0.0, 2.0]}, window=4, min_samples=4, threshold=1.0)
    for _ in range(3):
        monitor.update({"x": 2.0})
    assert monitor.check().features[0].drifted is False  # 3 < min_samples
    monitor.update({"x": 2.0})
    feature = monitor.check().features[0]
    # μ = 1, σ = √2 (ddof=1), x̄ = 2, n = 4: z = 1/(√2/2) = √2, effect = 1/√2
    assert feature.z_score == pytest.approx(math.sqrt(2))
    assert feature.effect_size == pytest.approx(1 / math.sqrt(2))
    assert feature.drifted


def test_feature_monitor_detects_mean_shift() -> None:
    rng = np.random.default_rng(5)
    monitor = FeatureDriftMonitor({"a": rng.normal(size=5000), "b": rng.uniform(size=5000)}, window=1000)
    for a, b in zip(rng.normal(size=1000), rng.uniform(size=1000), strict=True):
        monitor.update({"a": a, "b": b})
    assert not monitor.check().drifted
    for a in rng.normal(0.3, 1.0, size=1000):
        monitor.update({"a": a})
    report = monitor.check()
    assert report.drifted_features == ("a",)
    # The chapter's rule (|x̄ − μ|/σ > 2) misses a 0.3σ shift of the mean.
    chapter = FeatureDriftMonitor({"a": rng.normal(size=5000)}, threshold=0.0, min_effect_size=2.0)
    for a in rng.normal(0.3, 1.0, size=1000):
        chapter.update({"a": a})
    assert not chapter.check().drifted


def test_feature_monitor_rejects_unknown_feature() -> None:
    monitor = FeatureDriftMonitor({"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not in the reference"):
        monitor.update({"b": 1.0})
    with pytest.raises(ValueError, match="window"):
        FeatureDriftMonitor({"a": [1.0, 2.0]}, window=0)


# ------------------------------------------------------------------------------------------ multi-scale
def _first_results(stream: np.ndarray) -> tuple[int | None, tuple[int, str, str, int | None] | None]:
    """Index of the first drifted result, and (index, kind, severity, change_index) of the first decisive."""
    detector = MultiScaleDriftDetector()
    first_drift = None
    for i, value in enumerate(stream.tolist()):
        result = detector.update(value)
        if result.drifted and first_drift is None:
            first_drift = i
        if result.kind in ("sudden", "gradual"):
            return first_drift, (i, result.kind, result.severity, result.change_index)
    return first_drift, None


@pytest.mark.parametrize("seed", [0, 1])
def test_multiscale_classifies_sudden_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    stream = rng.normal(size=4500)
    stream[3000:] += 1.5
    first_drift, decisive = _first_results(stream)
    assert first_drift is not None and 3000 <= first_drift < 3150
    assert decisive is not None
    index, kind, severity, change_index = decisive
    assert kind == "sudden" and index < 3300
    assert severity == "critical"
    assert change_index is not None and abs(change_index - 3000) <= 20


@pytest.mark.parametrize("seed", [0, 1])
def test_multiscale_classifies_gradual_drift(seed: int) -> None:
    rng = np.random.default_rng(seed)
    stream = rng.normal(size=6000)
    stream[3000:] += np.linspace(0.0, 1.5, 3000)  # 0.0005σ per value
    first_drift, decisive = _first_results(stream)
    assert first_drift is not None and first_drift >= 3000
    assert decisive is not None
    _, kind, severity, change_index = decisive
    assert kind == "gradual"
    assert severity in ("medium", "high")  # gradual drift is never raised a level
    # A slow ramp's start is poorly determined (its corner is shallow): ±600 values of 3000.
    assert change_index is not None and abs(change_index - 3000) <= 600


def test_multiscale_stationary_no_alarm() -> None:
    for seed in range(3):
        stream = np.random.default_rng(10 + seed).normal(size=8000)
        assert _first_results(stream) == (None, None)


def test_severity_rules() -> None:
    assert drift_severity(3.0, "none") == "low"
    assert [drift_severity(d, "gradual") for d in (0.2, 0.7, 1.2)] == ["medium", "high", "critical"]
    assert [drift_severity(d, "undetermined") for d in (0.2, 0.7, 1.2)] == ["medium", "high", "critical"]
    assert [drift_severity(d, "sudden") for d in (0.2, 0.7, 1.2)] == ["high", "critical", "critical"]


def test_classify_change_noiseless_shapes() -> None:
    step = np.concatenate([np.zeros(300), np.ones(200)]) + 0.01 * np.sin(np.arange(500))
    fit = classify_change(step)
    assert fit.kind == "sudden" and fit.change_index == 300
    ramp = np.concatenate([np.zeros(200), np.linspace(0, 3, 300)]) + 0.01 * np.sin(np.arange(500))
    fit = classify_change(ramp)
    assert fit.kind == "gradual" and abs(fit.change_index - 200) <= 2


def test_multiscale_rejects_bad_windows() -> None:
    with pytest.raises(ValueError, match="short < medium < long"):
        MultiScaleDriftDetector(short=500, medium=100)


# ---------------------------------------------------------------------------- concept drift / calibration
def test_calibration_error_by_hand() -> None:
    # bin (0.9, 1]: conf 0.95, acc 0.5 → ½·0.45; bin (0.1, 0.2]: conf 0.15, acc 0 → ½·0.15; ECE = 0.3
    result = calibration_error([0.95, 0.95, 0.15, 0.15], [1, 0, 0, 0])
    assert result.ece == pytest.approx(0.3)
    assert (result.n, result.bins, result.accuracy) == (4, 10, 0.25)
    assert result.mean_confidence == pytest.approx(0.55)
    with pytest.raises(ValueError, match="confidence"):
        calibration_error([1.5], [1])


def test_concept_drift_monitor_window_and_adwin() -> None:
    rng = np.random.default_rng(11)
    monitor = ConceptDriftMonitor(window=200, threshold=0.1)
    labels = rng.integers(0, 10, size=6000)
    correct = np.concatenate([rng.random(3000) < 0.95, rng.random(3000) < 0.75])
    predictions = np.where(correct, labels, (labels + 1) % 10)
    confidences = np.where(correct, 0.9, 0.6)
    statuses = [
        monitor.update(int(p), int(y), float(c))
        for p, y, c in zip(predictions, labels, confidences, strict=True)
    ]
    before, after = statuses[:3000], statuses[3000:]
    assert not any(s.drifted for s in before)
    assert statuses[199].baseline_accuracy == pytest.approx(correct[:200].mean())
    window_alarm = next(i for i, s in enumerate(after) if s.window_alarm)
    adwin_alarm = next(i for i, s in enumerate(after) if s.adwin_alarm)
    assert window_alarm < 200 and adwin_alarm < 300
    assert after[-1].error_rate == pytest.approx(0.25, abs=0.05)
    calibration = monitor.calibration()
    conf = confidences[-1000:]
    assert calibration.ece == pytest.approx(calibration_error(conf, correct[-1000:].astype(float)).ece)
    assert calibration.n == 1000


# ------------------------------------------------------------------------------------------ text quality
def test_text_quality_by_hand() -> None:
    quality = text_quality("the cat sat. the cat ran.")
    assert quality.n_tokens == 6
    assert quality.unique_token_ratio == pytest.approx(4 / 6)  # the, cat, sat., ran.
    assert quality.distinct_bigram_ratio == pytest.approx(4 / 5)  # (the, cat) repeats
    # counts 2, 2, 1, 1 of 6: H = 2·(1/3)·log2 3 + 2·(1/6)·log2 6
    assert quality.token_entropy == pytest.approx(2 / 3 * math.log2(3) + 1 / 3 * math.log2(6))
    assert quality.mean_sentence_length == 3.0
    empty = text_quality("")
    assert (empty.n_tokens, empty.unique_token_ratio, empty.token_entropy) == (0, 0.0, 0.0)


def _fluent_text(rng: np.random.Generator, vocabulary: list[str]) -> str:
    sentences = [
        " ".join(rng.choice(vocabulary, size=rng.integers(6, 14))) for _ in range(rng.integers(3, 6))
    ]
    return ". ".join(sentences) + "."


def test_text_quality_monitor_alerts_on_repetitive_output() -> None:
    rng = np.random.default_rng(2)
    vocabulary = [f"w{i}" for i in range(300)]
    monitor = TextQualityMonitor([_fluent_text(rng, vocabulary) for _ in range(200)], window=20)
    for _ in range(20):
        monitor.update(_fluent_text(rng, vocabulary))
    assert not monitor.check().drifted
    for _ in range(20):
        monitor.update("I am sorry I am sorry I am sorry I am sorry I am sorry I am sorry I am sorry")
    report = monitor.check()
    assert {"unique_token_ratio", "distinct_bigram_ratio", "token_entropy"} <= set(report.drifted_features)
    degenerate = {f.name: f for f in report.features}["unique_token_ratio"]
    assert degenerate.z_score < -3 and degenerate.window_mean == pytest.approx(3 / 21)
