"""The monitor end to end on real request logs: GE validation, Evidently drift, feedback, MLflow.

Everything is real: a SQLite request log written through bentos/request_log.py, the MLflow SQLite
store of the session, Great Expectations and Evidently. Prompts are generated, so the expected answer
is known: the same generator as the reference must not be flagged; longer prompts in another
language must be.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from lockgate.bentos.request_log import RequestLog, RequestRow
from lockgate.flows.monitor import request_log_path, run_monitor
from lockgate.flows.spec_loader import load_spec
from lockgate.tasks.monitor import evidently_drift, parse_snapshot
from lockgate.tasks.monitoring.feedback import evaluate_feedback, fit_temperature, read_feedback
from lockgate.tasks.monitoring.window import text_descriptors, validate_window
from lockgate.tasks.platform.errors import DataValidationError

_WORDS = ["please", "tell", "me", "quickly", "what", "the", "sum", "is", "of", "these", "two", "numbers"]
_RU = ["пожалуйста", "скажите", "мне", "быстро", "какая", "сумма", "этих", "двух", "чисел", "вопрос", "ответ"]


def english_prompt(rng: random.Random) -> str:
    a, b = rng.randint(0, 29), rng.randint(0, 9)
    extra = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 4)))
    return f"Q: what is {a} plus {b}? {extra}".strip()


def russian_long_prompt(rng: random.Random) -> str:
    a, b = rng.randint(0, 29), rng.randint(0, 9)
    extra = " ".join(rng.choice(_RU) for _ in range(rng.randint(15, 30)))
    return f"Вопрос: сколько будет {a} плюс {b}? {extra}"


def write_requests(
    log: RequestLog,
    tokenizer,
    prompts: list[str],
    start_ts: float,
    rng: random.Random,
    latency_ms: float = 50.0,
) -> list[str]:
    ids = []
    for i, prompt in enumerate(prompts):
        request_id = uuid.uuid4().hex
        output = str(rng.randint(0, 40))
        log.append(
            RequestRow(
                ts=start_ts + i * 0.5,
                request_id=request_id,
                service_role="stable",
                model_name="m",
                model_version="1",
                endpoint="generate",
                user_hash=None,
                prompt_chars=len(prompt),
                prompt_tokens=len(tokenizer(prompt)["input_ids"]),
                output_tokens=len(output),
                latency_ms=rng.gauss(latency_ms, latency_ms / 5),
                status="ok",
                prompt=prompt,
                output=output,
            )
        )
        ids.append(request_id)
    return ids


def write_spec(folder: Path, name: str, model_dir: Path, reference: list[str], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt": reference}).to_json(folder / "reference.jsonl", orient="records", lines=True)
    spec = folder / "pipelines.yaml"
    spec.write_text(
        f"""\
version: 1
pipelines:
  {name}:
    model: {{source: "{model_dir}"}}
    data: {{reference: {{source: reference.jsonl}}}}
    compress:
      candidates:
        - name: int8
          steps: [{{quantize: {{bits: 8}}}}]
    monitor:
      min_rows: 20
      window_minutes: 60
      drift: {{baseline_windows: 1}}
      feedback: {{min_labels: 30, window: 40, max_ece: 0.1}}
{extra}
    tracking: {{experiment: monitor-tests, registered_model: {name}}}
"""
    )
    return spec


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm_dir)


def _scenario(
    tmp_path: Path, tiny_llm_dir: Path, tokenizer, drifted: bool, seed: int
) -> tuple[str, Path, float, list[str]]:
    rng = random.Random(seed)
    name = f"mon-{uuid.uuid4().hex[:6]}"
    spec = write_spec(tmp_path, name, tiny_llm_dir, [english_prompt(rng) for _ in range(200)])
    now = time.time()
    log = RequestLog(request_log_path(name))
    # Baseline window (the hour before the current one): the usual traffic.
    write_requests(log, tokenizer, [english_prompt(rng) for _ in range(60)], now - 5400, rng)
    make = russian_long_prompt if drifted else english_prompt
    ids = write_requests(log, tokenizer, [make(rng) for _ in range(80)], now - 1800, rng)
    log.close()
    return name, spec, now, ids


def test_undrifted_window_is_not_flagged(
    tmp_path: Path, tiny_llm_dir: Path, tokenizer, tracking: str
) -> None:
    name, spec_file, now, _ = _scenario(tmp_path, tiny_llm_dir, tokenizer, drifted=False, seed=1)
    spec = load_spec(spec_file).pipelines[name]
    report = run_monitor(spec_file, name, spec, now=now)
    assert report.drift.verdict == "no_drift", [c for c in report.drift.columns if c.drifted]
    assert report.drift.drift_share < 0.5
    assert {g.group for g in report.drift.groups} == {"prompts", "outputs"}
    assert report.detectors["data_drift"] is False
    assert report.detectors["concept_drift"] is None  # no feedback file: undetermined, not "fine"
    assert all(r.outcome == "quiet" for r in report.responses)


def test_drifted_window_is_flagged_reported_and_logged(
    tmp_path: Path, tiny_llm_dir: Path, tokenizer, tracking: str
) -> None:
    name, spec_file, now, ids = _scenario(tmp_path, tiny_llm_dir, tokenizer, drifted=True, seed=2)
    # Feedback: right at first, then wrong, each claimed at 95 % confidence (over-confident).
    outputs = RequestLog(request_log_path(name)).read_frame().set_index("request_id")["output"]
    labels = [outputs[i] if k < 40 else "wrong" for k, i in enumerate(ids)]
    feedback = Path(spec_file.parent / "fb.csv")
    pd.DataFrame({"request_id": ids, "label": labels, "confidence": 0.95}).to_csv(feedback, index=False)
    spec_file.write_text(spec_file.read_text().replace("max_ece: 0.1}", "max_ece: 0.1, file: fb.csv}"))
    spec = load_spec(spec_file).pipelines[name]

    report = run_monitor(spec_file, name, spec, now=now)

    drift = report.drift
    assert drift.verdict == "drift"
    drifted = {c.column for c in drift.columns if c.drifted}
    assert {"prompt_chars", "prompt_tokens", "prompt_non_ascii_share", "prompt_script"} <= drifted
    script = next(c for c in drift.columns if c.column == "prompt_script")
    assert script.method in ("chisquare", "z")  # categorical test, resolved explicitly
    # Reports under reports/<pipeline>/monitor/<timestamp>/, HTML and JSON per group.
    assert report.out_dir.parent.name == "monitor" and report.out_dir.parent.parent.name == name
    for group in drift.groups:
        assert group.html_path.is_file() and group.json_path.is_file()
    assert json.loads((report.out_dir / "monitor.json").read_text())["detectors"]["data_drift"] is True
    # Feedback: accuracy fell and confidence stayed high.
    assert report.detectors["concept_drift"] is True
    assert report.detectors["calibration"] is True
    assert report.feedback.calibration is not None and report.feedback.calibration.ece > 0.3
    assert {r.detector: r.outcome for r in report.responses}["data_drift"] == "alerted"
    # MLflow: the monitor run and its nested stage run carry the metrics the UI charts.
    runs = mlflow.search_runs(
        experiment_names=["monitor-tests"], filter_string=f"tags.`lockgate.pipeline` = '{name}'"
    )
    assert len(runs) == 1
    parent = runs.iloc[0]
    assert parent["metrics.alarm_data_drift"] == 1.0 and parent["metrics.feedback_ece"] > 0.3
    stage = mlflow.search_runs(
        experiment_names=["monitor-tests"], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
    ).iloc[0]
    assert stage["metrics.drift_share"] >= 0.5
    assert stage["metrics.drifted_prompt_chars"] == 1.0
    assert stage["tags.lockgate.drift_verdict"] == "drift"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(stage.run_id, "drift")}
    assert "drift/drift-prompts.html" in artifacts and "drift/drift-prompts.json" in artifacts


def _window(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": np.arange(n, dtype=float),
            "request_id": [f"r{i}" for i in range(n)],
            "status": ["ok"] * (n - 2) + ["rejected", "error"],
            "prompt_chars": 10,
            "prompt_tokens": 5,
            "output_tokens": [4] * (n - 2) + [None, None],
            "latency_ms": [20.0] * (n - 2) + [None, 3.0],
        }
    )


def test_window_validation_names_column_and_expectation() -> None:
    from lockgate.flows.spec import MonitorSpec

    spec = MonitorSpec()
    assert validate_window(_window(), spec).successful > 0  # refused rows may lack features
    bad = _window()
    bad.loc[3, "latency_ms"] = -5.0
    bad.loc[4, "status"] = "lost"
    bad.loc[5, "prompt_tokens"] = None
    with pytest.raises(DataValidationError) as info:
        validate_window(bad, spec)
    message = str(info.value)
    assert "expect_column_values_to_be_between(column=latency_ms" in message and "[-5.0]" in message
    assert "expect_column_values_to_be_in_set(column=status" in message and "'lost'" in message
    assert "expect_column_values_to_not_be_null(column=prompt_tokens" in message
    with pytest.raises(DataValidationError, match=r"expect_column_to_exist\(column=latency_ms\)"):
        validate_window(_window().drop(columns=["latency_ms"]), spec)


def test_snapshot_is_parsed_by_type_and_id_not_position(tmp_path: Path) -> None:
    from lockgate.flows.spec import DriftSpec

    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300)})
    current = pd.DataFrame({"a": rng.normal(2.0, size=200), "b": rng.normal(size=200)})
    dataset, columns, _, json_path, _ = evidently_drift(current, reference, DriftSpec(), tmp_path, "prompts")
    assert {c.column: c.drifted for c in columns} == {"a": True, "b": False}
    assert dataset.count == 1 and dataset.share == 0.5
    snapshot = json.loads(json_path.read_text())
    snapshot["metrics"].reverse()
    snapshot["tests"].reverse()
    assert parse_snapshot(snapshot, "prompts") == (dataset, columns)


def test_large_reference_uses_distances_with_their_threshold(tmp_path: Path) -> None:
    from lockgate.flows.spec import DriftSpec

    rng = np.random.default_rng(1)
    reference = pd.DataFrame({"a": rng.normal(size=3000), "b": rng.normal(size=3000)})
    current = pd.DataFrame({"a": rng.normal(0.5, size=2000), "b": rng.normal(size=2000)})
    _, columns, _, _, _ = evidently_drift(current, reference, DriftSpec(), tmp_path, "prompts")
    by_name = {c.column: c for c in columns}
    # Wasserstein is a distance: drift when it is *above* 0.1 (a p-value rule would invert this).
    assert by_name["a"].method == "wasserstein" and by_name["a"].threshold == 0.1
    assert by_name["a"].drifted and by_name["a"].score > 0.1
    assert not by_name["b"].drifted and by_name["b"].score < 0.1


def test_text_descriptors_are_offline_and_exact() -> None:
    frame = text_descriptors(pd.Series(["Hello World 42!", "привет мир", ""]), "p")
    assert frame.loc[0, "p_words"] == 3 and frame.loc[0, "p_digit_share"] == pytest.approx(2 / 15)
    assert frame.loc[1, "p_non_ascii_share"] == pytest.approx(9 / 10)
    assert list(frame["p_script"]) == ["latin", "cyrillic", "none"]
    assert frame.loc[2, "p_unique_word_ratio"] == 0.0


def test_feedback_file_errors_name_column_and_line(tmp_path: Path) -> None:
    path = tmp_path / "fb.csv"
    path.write_text("request_id,label,confidence\na,1,0.5\nb,2,1.7\n")
    with pytest.raises(
        DataValidationError, match=r"column 'confidence' must be a number in \[0, 1\] \(line 3\)"
    ):
        read_feedback(path)
    path.write_text("request_id,answer\na,1\n")
    with pytest.raises(DataValidationError, match="missing column 'label'"):
        read_feedback(path)


def test_feedback_human_judgements_and_temperature_fit() -> None:
    from lockgate.flows.spec import FeedbackSpec

    rng = np.random.default_rng(3)
    n = 400
    requests = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "ts": np.arange(n, dtype=float),
            "status": "ok",
            "output": None,
        }
    )
    confidence = rng.uniform(0.6, 1.0, size=n)
    correct = (rng.uniform(size=n) < 0.6).astype(float)  # 60 % right at ~80 % confidence
    feedback = pd.DataFrame(
        {"request_id": requests["request_id"], "label": "", "confidence": confidence, "correct": correct}
    )
    result = evaluate_feedback(feedback, requests, FeedbackSpec(min_labels=30))
    assert result.labels == n and result.calibration_drift
    fit = fit_temperature(np.array(result.confidence), np.array(result.correct))
    assert fit.temperature > 1.0  # over-confident: soften
    assert fit.ece_after < fit.ece_before / 2 and fit.nll_after < fit.nll_before


@pytest.mark.slow  # a temporary Prefect API plus a full monitor pass: over a minute on 2 shared cores
def test_monitor_flow_runs_as_a_prefect_flow(
    tmp_path: Path, tiny_llm_dir: Path, tokenizer, tracking: str, prefect_harness: None
) -> None:
    from prefect.client.orchestration import get_client

    from lockgate.flows.monitor import monitor_flow

    name, spec_file, _, _ = _scenario(tmp_path, tiny_llm_dir, tokenizer, drifted=True, seed=3)
    state = monitor_flow(str(spec_file), name, return_state=True)
    assert state.is_completed(), state
    assert state.result().verdict == "drift"
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    assert any(
        r.name.startswith("monitor-") and r.flow_run_id == state.state_details.flow_run_id for r in runs
    )


def _served(prompts: list[str], tokenizer, rng: random.Random, text: bool) -> pd.DataFrame:
    """Served requests as the request log holds them (text columns only when text is logged)."""
    outputs = [str(rng.randint(0, 40)) for _ in prompts]
    frame = pd.DataFrame(
        {
            "prompt_chars": [len(p) for p in prompts],
            "prompt_tokens": [len(tokenizer(p)["input_ids"]) for p in prompts],
            "output_tokens": [len(o) for o in outputs],
            "latency_ms": [rng.gauss(50, 10) for _ in prompts],
        }
    )
    if text:
        frame["prompt"], frame["output"] = prompts, outputs
    return frame


def test_replaying_the_reference_is_not_drift(tmp_path: Path, tiny_llm_dir: Path, tokenizer) -> None:
    from lockgate.flows.spec import MonitorSpec
    from lockgate.tasks.monitor import drift_report
    from lockgate.tasks.monitoring.window import reference_prompt_features

    rng = random.Random(7)
    prompts = [english_prompt(rng) for _ in range(120)]
    reference = reference_prompt_features(prompts, tiny_llm_dir)
    baseline = _served(prompts, tokenizer, rng, text=True)
    for replay in (prompts, rng.sample(prompts, len(prompts))):  # as logged, and in another order
        current = _served(replay, tokenizer, rng, text=True)
        result = drift_report(current, reference, MonitorSpec(), tmp_path / "text", baseline)
        prompts_group = next(g for g in result.groups if g.group == "prompts")
        assert result.verdict == "no_drift", [c for c in result.columns if c.drifted]
        assert prompts_group.dataset.count == 0 and len(prompts_group.columns) >= 5
    # Without logged text only two length features per group exist: they may not decide alone.
    lengths = drift_report(
        _served(prompts, tokenizer, rng, text=False), reference, MonitorSpec(), tmp_path / "lengths"
    )
    assert lengths.verdict == "insufficient_data"
    assert any("prompts: 2 compared column(s) < drift.min_columns 3" in note for note in lengths.notes)


def test_one_of_two_length_features_cannot_trip_drift(tmp_path: Path, tiny_llm_dir: Path, tokenizer) -> None:
    from lockgate.flows.spec import MonitorSpec
    from lockgate.tasks.monitor import drift_report
    from lockgate.tasks.monitoring.window import reference_prompt_features

    rng = random.Random(8)
    prompts = [english_prompt(rng) for _ in range(200)]
    reference = reference_prompt_features(prompts, tiny_llm_dir)
    current = _served(prompts[:100], tokenizer, rng, text=False)
    current["prompt_chars"] += 3  # one feature shifts (a changed template), the other does not
    result = drift_report(current, reference, MonitorSpec(), tmp_path)
    assert {c.column: c.drifted for c in result.columns} == {"prompt_chars": True, "prompt_tokens": False}
    assert result.verdict == "insufficient_data"  # was "drift": 1 of 2 columns reached the 0.5 share
    assert math.isnan(result.drift_share)


def test_drifted_count_is_counted_from_the_per_column_table(tmp_path: Path) -> None:
    from lockgate.flows.spec import DriftSpec

    rng = np.random.default_rng(3)
    reference = pd.DataFrame({k: rng.normal(size=300) for k in "abc"})
    current = pd.DataFrame(
        {"a": rng.normal(0.4, size=200), "b": rng.normal(size=200), "c": rng.normal(size=200)}
    )
    # A distance method with a loose threshold: its table says no column drifts, while Evidently's
    # DriftedColumnsCount (its own default K-S tests) counted column a.
    spec = DriftSpec(numerical_method="wasserstein", distance_threshold=2.0)
    dataset, columns, _, json_path, _ = evidently_drift(current, reference, spec, tmp_path, "prompts")
    assert [c.drifted for c in columns] == [False, False, False]
    assert (dataset.count, dataset.share) == (0, 0.0)
    kinds = {m["config"]["type"].rsplit(":", 1)[-1] for m in json.loads(json_path.read_text())["metrics"]}
    assert kinds == {"ValueDrift"}  # one test per column, nothing else that could disagree
