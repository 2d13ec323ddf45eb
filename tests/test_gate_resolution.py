"""Gates tighter than the evaluation set can resolve: warned about by `lockgate validate` and the summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from conftest import run_cli
from lockgate.flows.release import ReleaseSummary
from lockgate.flows.spec import RelativeGate
from lockgate.flows.summary import render_summary
from lockgate.tasks.compression.gate_resolution import (
    accuracy_needed,
    accuracy_warning,
    perplexity_noise_pct,
    perplexity_warning,
)
from lockgate.tasks.evaluate import Evaluation, ModelMetrics, check_gates


def test_the_issue_case_is_flagged_and_a_resolvable_gate_is_not() -> None:
    # 65 of 200 right: a 5 % drop is 3 questions, while the accuracy's 2 standard errors are 20 %.
    message = accuracy_warning(5, 200, 65 / 200)
    assert message is not None and "below 2 standard errors" in message and "3.2 of 65" in message
    # A drop smaller than one right answer fails on one flipped question.
    assert "one flipped answer" in (accuracy_warning(1, 50, 0.6) or "")
    # The demo: 92 % of 200 right, 10 % allowed (18 questions) vs 2 SE of 4.2 %: resolvable.
    assert accuracy_warning(10, 200, 0.92) is None
    # Before a run: the accuracy the parent needs for the gate to clear 2 standard errors.
    assert math.isclose(accuracy_needed(5, 200), 4 / 4.5)
    assert accuracy_warning(5, 200, None) is None  # clears them from 89 %: not flagged before a run
    assert "more than 96% right" in (accuracy_warning(5, 65, None) or "")
    assert "less than one question" in (accuracy_warning(1, 50, None) or "")


def test_perplexity_noise_rule() -> None:
    assert math.isclose(perplexity_noise_pct(200), 100 * math.expm1(0.5 / math.sqrt(200)))
    assert round(perplexity_noise_pct(200), 1) == 3.6 and round(perplexity_noise_pct(20), 1) == 11.8
    assert "typical noise on 200 evaluation rows (3.6 %" in (perplexity_warning(1.0, 200) or "")
    assert perplexity_warning(10.0, 200) is None


def _spec(eval_source: str, gates: str) -> str:
    return f"""\
version: 1
pipelines:
  own:
    model: {{source: ./model}}
    data:
      eval: {{source: {eval_source}}}
    compress:
      candidates:
        - name: int8
          steps: [{{quantize: {{bits: 8}}}}]
    evaluate:
      gates:
{gates}
    tracking: {{registered_model: own-llm}}
"""


def test_validate_warns_at_the_gate_with_the_set_size_it_read(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(60)]
    pd.DataFrame(rows).to_json(tmp_path / "eval.jsonl", orient="records", lines=True)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        _spec(
            "eval.jsonl", "        perplexity: {max_increase_pct: 2.0}\n        accuracy: {max_drop_pct: 1.0}"
        )
    )
    done = run_cli("validate", "-f", str(spec))
    assert done.returncode == 0, done.stderr  # warnings, not errors
    assert done.stderr.strip().splitlines() == [
        f"{spec}:13:40: pipelines.own.evaluate.gates.perplexity.max_increase_pct: warning: a 2 % "
        "perplexity rise is below its typical noise on 60 evaluation rows (6.7 %: 2 standard errors of a "
        "0.25 nat per-row log-likelihood spread)",
        f"{spec}:14:34: pipelines.own.evaluate.gates.accuracy.max_drop_pct: warning: a 1 % accuracy drop "
        "is less than one question of 60 evaluation rows even if the parent answers all of them (one "
        "question is 1.7 %)",
    ]
    payload = json.loads(run_cli("validate", "-f", str(spec), "--json").stdout)
    assert payload["valid"] is True and len(payload["warnings"]) == 2
    # The evaluate section caps the rows used; a loose gate is quiet; so is a set not known yet.
    spec.write_text(_spec("eval.jsonl", "        accuracy: {max_drop_pct: 30.0}"))
    assert run_cli("validate", "-f", str(spec)).stderr == ""
    spec.write_text(_spec("missing.jsonl", "        accuracy: {max_drop_pct: 1.0}"))
    assert run_cli("validate", "-f", str(spec)).stderr == ""


def test_release_summary_warns_next_to_the_gates() -> None:
    def metrics(accuracy: float, perplexity: float) -> ModelMetrics:
        return ModelMetrics(perplexity, accuracy, 0.1, 10.0, 12.0, 13.0, 50.0, 1000)

    parent, candidate = metrics(65 / 200, 4.0), metrics(64 / 200, 4.02)
    gates = {"accuracy": RelativeGate(max_drop_pct=5.0), "perplexity": RelativeGate(max_increase_pct=10.0)}
    evaluation = Evaluation(
        parent, candidate, check_gates(parent, candidate, gates), pd.DataFrame({"prompt": ["q"] * 200})
    )
    summary = ReleaseSummary("own", "own-llm", "rejected", "run", "http://mlflow/run", "flow", 1.0)
    summary.candidates = {"int8": evaluation}
    text = render_summary(summary)
    warnings = [line for line in text.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning    accuracy.max_drop_pct 5: a 5 % drop (3.2 of 65 right answers)")
