"""Choosing among candidates: objective, gates, Pareto fronts, the reason each candidate lost."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lockgate.flows.spec import ObjectiveSpec, RelativeGate
from lockgate.tasks.compression.selection import pareto_front, plot_pareto, select_candidate
from lockgate.tasks.evaluate import Evaluation, ModelMetrics, check_gate, check_gates

PARENT = ModelMetrics(2.0, 0.90, 0.05, 10.0, 12.0, 13.0, 100.0, 8_000_000)


def metrics(accuracy: float, p95: float, size: int, p50: float | None = None) -> ModelMetrics:
    return ModelMetrics(2.0, accuracy, 0.05, p50 if p50 is not None else p95 * 0.8, p95, p95, 100.0, size)


def evaluation(
    candidate: ModelMetrics, gates: dict[str, RelativeGate], quantized: bool = False
) -> Evaluation:
    return Evaluation(PARENT, candidate, check_gates(PARENT, candidate, gates, quantized), pd.DataFrame())


GATES = {"accuracy": RelativeGate(max_drop_pct=5.0)}


def test_choice_among_three_follows_the_objective() -> None:
    names = ["int8", "int4", "pruned"]
    evals = [
        evaluation(metrics(0.89, 9.0, 2_000_000), GATES),
        evaluation(metrics(0.88, 11.0, 1_000_000), GATES),
        evaluation(metrics(0.87, 7.0, 6_000_000), GATES),
    ]
    fastest = select_candidate(names, evals, ObjectiveSpec(metric="latency_p95_ms", goal="minimize"))
    smallest = select_candidate(names, evals, ObjectiveSpec(metric="size_bytes", goal="minimize"))
    best = select_candidate(names, evals, ObjectiveSpec(metric="accuracy", goal="maximize"))
    assert (fastest.winner, smallest.winner, best.winner) == ("pruned", "int4", "int8")
    reasons = {r.name: r.reason for r in fastest.rows}
    assert reasons["pruned"] == ""
    assert reasons["int8"].startswith("lost on latency_p95_ms (minimize): 9 vs 7 for pruned")


def test_a_candidate_that_fails_a_gate_is_never_chosen_even_if_best_on_the_objective() -> None:
    names = ["fast-but-wrong", "slow-but-right"]
    evals = [
        evaluation(metrics(0.50, 1.0, 1_000_000), GATES),
        evaluation(metrics(0.90, 20.0, 1_000_000), GATES),
    ]
    selection = select_candidate(names, evals, ObjectiveSpec())
    assert selection.winner == "slow-but-right"
    failed = next(r for r in selection.rows if r.name == "fast-but-wrong")
    assert not failed.passed and failed.reason.startswith("failed gate: accuracy max_drop_pct 5")


def test_no_winner_when_every_candidate_fails() -> None:
    selection = select_candidate(["a"], [evaluation(metrics(0.1, 1.0, 1), GATES)], ObjectiveSpec())
    assert selection.winner is None


def test_a_quantized_candidate_slower_than_its_parent_fails_the_not_slower_rule() -> None:
    slower = metrics(0.90, 12.0, 2_000_000, p50=10.5)  # median 10.5 ms vs the parent's 10.0
    gates = check_gates(PARENT, slower, GATES, quantized_must_not_be_slower=True)
    rule = next(g for g in gates if g.rule == "quantized_not_slower")
    assert not rule.passed and rule.observed == pytest.approx(1.05)
    # Not quantized (e.g. pruned): the rule does not apply.
    assert all(g.rule != "quantized_not_slower" for g in check_gates(PARENT, slower, GATES))


def test_min_speedup_gate_is_baseline_over_candidate_for_latency_and_the_ratio_for_throughput() -> None:
    (latency,) = check_gate("latency_p95_ms", RelativeGate(min_speedup=1.5), 12.0, 6.0)
    (throughput,) = check_gate("tokens_per_s", RelativeGate(min_speedup=1.5), 100.0, 140.0)
    assert latency.passed and latency.observed == pytest.approx(2.0)
    assert not throughput.passed and throughput.observed == pytest.approx(1.4)


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = {"a": (1.0, 5.0), "b": (2.0, 2.0), "c": (3.0, 3.0), "d": (0.5, 9.0)}
    assert pareto_front(points) == {"a", "b", "d"}


def test_pareto_plot_and_table_are_written(tmp_path: Path) -> None:
    names = ["int8", "int4", "pruned"]
    evals = [
        evaluation(metrics(0.89, 9.0, 2_000_000), GATES),
        evaluation(metrics(0.88, 11.0, 1_000_000), GATES),
        evaluation(metrics(0.40, 7.0, 6_000_000), GATES),
    ]
    selection = select_candidate(names, evals, ObjectiveSpec())
    png = plot_pareto(selection, PARENT.as_dict(), tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = selection.markdown()
    assert "| int8 | pass |" in table and "**chosen**" in table and "| pruned | FAIL |" in table
