"""Evaluation maths with known answers: exact match, ECE, gate arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lockgate.flows.spec import RelativeGate
from lockgate.tasks.evaluate import ModelMetrics, check_gate, check_gates, exact_match
from lockgate.tasks.monitoring.calibration import expected_calibration_error


def test_exact_match_takes_first_line_stripped() -> None:
    assert exact_match(" 19\nQ: next", "19")
    assert exact_match("19", " 19 ")
    assert not exact_match(" 190", "19")
    assert not exact_match("\n19", "19")


def test_ece_known_answers() -> None:
    # Perfectly calibrated: confidence 0.75 bin with 3/4 correct -> 0.
    assert expected_calibration_error(np.array([0.75] * 4), np.array([1, 1, 1, 0.0])) == pytest.approx(0.0)
    # Always 0.9 confident, always wrong -> 0.9.
    assert expected_calibration_error(np.array([0.9] * 5), np.zeros(5)) == pytest.approx(0.9)
    # Two bins, half the samples each: |1-0.95|*0.5 + |0-0.15|*0.5 = 0.1
    conf = np.array([0.95, 0.95, 0.15, 0.15])
    assert expected_calibration_error(conf, np.array([1, 1, 0, 0.0])) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0


def test_gate_bounds() -> None:
    [rise] = check_gate("perplexity", RelativeGate(max_increase_pct=1.0), 10.0, 10.05)
    assert rise.passed and rise.observed == pytest.approx(0.5)
    [rise] = check_gate("perplexity", RelativeGate(max_increase_pct=1.0), 10.0, 10.2)
    assert not rise.passed and rise.observed == pytest.approx(2.0)
    [drop] = check_gate("accuracy", RelativeGate(max_drop_pct=5.0), 0.80, 0.78)
    assert drop.passed and drop.observed == pytest.approx(2.5)
    ratio, floor = check_gate("size_bytes", RelativeGate(max_ratio=0.5, min_ratio=0.1), 100.0, 30.0)
    assert (ratio.rule, ratio.passed, floor.rule, floor.passed) == ("max_ratio", True, "min_ratio", True)
    [zero] = check_gate("accuracy", RelativeGate(max_drop_pct=1.0), 0.0, 0.0)
    assert zero.passed and zero.observed == 0.0
    [from_zero] = check_gate("ece", RelativeGate(max_increase_pct=10.0), 0.0, 0.1)
    assert not from_zero.passed and math.isinf(from_zero.observed)


def test_check_gates_uses_named_metrics() -> None:
    base = ModelMetrics(10.0, 0.8, 0.05, 10.0, 12.0, 13.0, 100.0, 1000)
    cand = ModelMetrics(10.1, 0.8, 0.05, 9.0, 11.0, 12.0, 110.0, 300)
    results = check_gates(
        base,
        cand,
        {"size_bytes": RelativeGate(max_ratio=0.5), "latency_p95_ms": RelativeGate(max_increase_pct=0.0)},
    )
    assert [(r.metric, r.passed) for r in results] == [("size_bytes", True), ("latency_p95_ms", True)]
    assert "size_bytes max_ratio 0.5: observed 0.3" in results[0].message


def test_baseline_quality_is_computed_once_per_baseline_and_rows(
    tiny_llm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every candidate of a release is compared with the same baseline on the same rows: its quality
    is computed once and reused (greedy outputs and teacher-forced scores are deterministic)."""
    import logging

    import pandas as pd

    from lockgate.flows.spec import EvaluateSpec
    from lockgate.tasks import evaluate

    rows = pd.DataFrame({"prompt": [f"Q: what is {i} plus 1?\nA:" for i in range(4)], "answer": ["1"] * 4})
    spec = EvaluateSpec(max_samples=4, latency_prompts=5, warmup=0, gates={})
    evaluate._BASELINE_QUALITY.clear()
    with caplog.at_level(logging.INFO, logger="lockgate"):
        first = evaluate.evaluate_pair(tiny_llm_dir, tiny_llm_dir, rows, spec)
        second = evaluate.evaluate_pair(tiny_llm_dir, tiny_llm_dir, rows, spec)
    reused = [r for r in caplog.records if "reused from an earlier candidate" in r.getMessage()]
    assert len(reused) == 1 and len(evaluate._BASELINE_QUALITY) == 1
    for name in ("perplexity", "accuracy", "ece"):
        assert getattr(second.baseline, name) == getattr(first.baseline, name)
        # The candidate (the same weights, computed afresh) agrees with the cached baseline.
        assert getattr(second.candidate, name) == pytest.approx(getattr(first.baseline, name))
    evaluate.evaluate_pair(tiny_llm_dir, tiny_llm_dir, rows.head(3), spec)  # other rows: computed anew
    assert len(evaluate._BASELINE_QUALITY) == 2


def test_baseline_quality_cache_is_bounded(tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived process runs release after release: the cache keeps the most recently used baselines
    only, so it cannot grow with every release."""
    import pandas as pd

    from lockgate.flows.spec import EvaluateSpec
    from lockgate.tasks import evaluate

    rows = pd.DataFrame({"prompt": [f"Q: what is {i} plus 2?\nA:" for i in range(4)], "answer": ["2"] * 4})
    spec = EvaluateSpec(max_samples=4, latency_prompts=5, warmup=0, gates={})
    monkeypatch.setattr(evaluate, "_BASELINE_QUALITY_MAX", 2)
    evaluate._BASELINE_QUALITY.clear()
    for n in (2, 3, 2, 4):  # rows.head(2) is used again before rows.head(4) arrives
        evaluate.evaluate_pair(tiny_llm_dir, tiny_llm_dir, rows.head(n), spec)
        assert len(evaluate._BASELINE_QUALITY) <= 2
    kept = sorted(key[3] for key in evaluate._BASELINE_QUALITY)  # key[3]: the number of rows
    assert kept == [2, 4]  # head(3), the least recently used, was dropped


def test_gates_and_objectives_name_exactly_the_evaluated_metrics() -> None:
    """One Metric literal for gates and objectives, and it is what the evaluation measures: a metric
    added to one side only fails here."""
    from dataclasses import fields
    from typing import get_args

    from lockgate.flows.spec import EvaluateSpec, Metric, ObjectiveSpec
    from lockgate.tasks.evaluate import ModelMetrics

    assert get_args(Metric) == tuple(f.name for f in fields(ModelMetrics))
    assert EvaluateSpec.model_fields["gates"].annotation == dict[Metric, RelativeGate]
    assert ObjectiveSpec.model_fields["metric"].annotation == Metric
