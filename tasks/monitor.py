"""Stage 7: Evidently drift report of the served traffic (request log) against the reference set.

The services log request *features* (never raw text by default); the reference prompts are turned
into the same features with the served model's tokenizer, so both sides are comparable.
The report is parsed once into typed results (:class:`DriftResult`) — metrics are found by their
type and column, never by position in the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task

from tasks.log import get_logger
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import MonitorSpec

log = get_logger(__name__)
DRIFT_FEATURES = ("prompt_chars", "prompt_tokens")


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    verdict: str  # "drift" | "no_drift" | "insufficient_data"
    drift_share: float
    drifted_columns: int
    columns: tuple[ColumnDrift, ...]
    current_rows: int
    reference_rows: int
    html_path: Path | None
    json_path: Path | None

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "drift_share": self.drift_share,
            "drifted_columns": float(self.drifted_columns),
            "current_rows": float(self.current_rows),
        }
        metrics.update({f"drift_score_{c.column}": c.score for c in self.columns})
        return metrics


def reference_features(prompts: list[str], tokenizer_dir: Path) -> pd.DataFrame:
    """The request-log features of reference prompts, computed as the service computes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return pd.DataFrame(
        {
            "prompt_chars": [len(p) for p in prompts],
            "prompt_tokens": [len(tokenizer(p)["input_ids"]) for p in prompts],
        }
    ).astype(float)


def _parse(snapshot_dict: dict, threshold: float) -> tuple[float, int, tuple[ColumnDrift, ...]]:
    share, count, columns = math.nan, 0, []
    for metric in snapshot_dict["metrics"]:
        config = metric["config"]
        kind = config["type"].rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            share, count = float(metric["value"]["share"]), int(metric["value"]["count"])
        elif kind == "ValueDrift":
            score = float(metric["value"])
            # K-S and friends report p-values: drift when p < threshold.
            columns.append(
                ColumnDrift(config["column"], config["method"], score, threshold, score < threshold)
            )
    return share, count, tuple(columns)


def drift_report(
    current: pd.DataFrame, reference: pd.DataFrame, spec: MonitorSpec, out_dir: Path
) -> DriftResult:
    """Evidently drift of ``DRIFT_FEATURES``; HTML + JSON in ``out_dir``; typed verdict."""
    if len(current) < spec.min_rows:
        log.warning("monitor: %d logged requests < min_rows %d: no verdict", len(current), spec.min_rows)
        return DriftResult("insufficient_data", math.nan, 0, (), len(current), len(reference), None, None)
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    columns = list(DRIFT_FEATURES)
    definition = DataDefinition(numerical_columns=columns)
    metrics = [DriftedColumnsCount(columns=columns, drift_share=spec.drift.max_drift_share)]
    metrics += [ValueDrift(column=c, threshold=spec.drift.stattest_threshold) for c in columns]
    snapshot = Report(metrics).run(
        current_data=Dataset.from_pandas(current[columns].astype(float), data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns].astype(float), data_definition=definition),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "drift.html", out_dir / "drift.json"
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))
    share, count, column_results = _parse(snapshot.dict(), spec.drift.stattest_threshold)
    drifted = any(c.drifted for c in column_results) and share >= spec.drift.max_drift_share
    result = DriftResult(
        "drift" if drifted else "no_drift",
        share,
        count,
        column_results,
        len(current),
        len(reference),
        html_path,
        json_path,
    )
    (out_dir / "verdict.json").write_text(json.dumps(asdict(result), default=str, indent=2))
    log.info("monitor: verdict %s (drift share %.2f over %d requests)", result.verdict, share, len(current))
    return result


def served_traffic(request_log: Path, since: float | None) -> pd.DataFrame:
    """Successful requests logged by the services since ``since`` (unix time)."""
    from bentos.request_log import RequestLog

    if not request_log.exists():
        return pd.DataFrame(columns=[*DRIFT_FEATURES, "status"])
    frame = RequestLog(request_log).read_frame(since=since)
    return frame[frame["status"] == "ok"].reset_index(drop=True)


@task(name="monitor")
def monitor_task(
    request_log: Path,
    since: float | None,
    reference_prompts: list[str],
    tokenizer_dir: Path,
    spec: MonitorSpec,
    out_dir: Path,
    parent_run_id: str | None,
) -> DriftResult:
    """Drift report in a nested MLflow run: HTML/JSON as artifacts, share and scores as metrics."""
    import mlflow

    with stage_run(parent_run_id, "monitor"):
        current = served_traffic(request_log, since)
        reference = reference_features(reference_prompts, tokenizer_dir)
        result = drift_report(current, reference, spec, out_dir)
        mlflow.log_metrics({k: v for k, v in result.as_metrics().items() if not math.isnan(v)})
        mlflow.set_tag("lockgate.drift_verdict", result.verdict)
        for path in (result.html_path, result.json_path):
            if path is not None:
                mlflow.log_artifact(str(path), "drift")
    return result
