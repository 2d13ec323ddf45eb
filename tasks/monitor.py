"""Stage 7: Evidently drift report of the served traffic (request log) against its references.

The request window is validated with Great Expectations first (:mod:`tasks.request_window`); then two
feature groups are compared, each with its own reference:

* ``prompts``: prompt length, token count, character classes, script share and offline text
  descriptors, against the spec's reference prompts featurised the same way;
* ``outputs``: output tokens, latency and output descriptors, against a baseline window of the same
  request log (the reference set has no outputs or latencies).

The Evidently snapshot is parsed once into typed results (:class:`ColumnDrift`) by metric *type* and
metric id — never by position in the JSON — and the per-column verdict is Evidently's own drift test,
so the direction of each method (p-value below, distance above its threshold) is never guessed here.

One test per column, one verdict from that table: a group's drifted count and share are counted from
its per-column rows (Evidently's ``DriftedColumnsCount`` runs its own default tests, which disagreed
with the table: "11 of 11" over a table showing 10). A group drifts when at least
``drift.max_drift_share`` of its columns drift, and only a group compared on at least
``drift.min_columns`` columns may decide: two length features at p < 0.05 flag about one window in
ten by chance, and one of two was already the default share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from prefect import task

from lockgate.tasks.monitoring.window import (
    output_features,
    prompt_features,
    read_window,
    reference_prompt_features,
    served_ok,
    validate_window,
)
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import DriftSpec, MonitorSpec

log = get_logger(__name__)
Verdict = Literal["drift", "no_drift", "insufficient_data"]
Group = Literal["prompts", "outputs"]
#: Evidently's own switch from small-sample tests to distances (its documented auto rule).
_SMALL_REFERENCE = 1000


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool
    group: str = "prompts"


@dataclass(frozen=True)
class DatasetDrift:
    """Drifted columns of one report, counted from its per-column table."""

    count: int
    share: float

    @classmethod
    def of(cls, columns: tuple[ColumnDrift, ...]) -> DatasetDrift:
        count = sum(c.drifted for c in columns)
        return cls(count, count / len(columns) if columns else 0.0)


@dataclass(frozen=True)
class GroupDrift:
    group: str
    reference: str  # "reference set" | "baseline window"
    reference_rows: int
    dataset: DatasetDrift
    columns: tuple[ColumnDrift, ...]
    html_path: Path
    json_path: Path


@dataclass(frozen=True)
class DriftResult:
    verdict: Verdict
    drift_share: float  # share of drifted columns in the most drifted group
    drifted_columns: int
    columns: tuple[ColumnDrift, ...]
    current_rows: int
    reference_rows: int
    html_path: Path | None
    json_path: Path | None
    groups: tuple[GroupDrift, ...] = ()
    notes: tuple[str, ...] = ()  # why a group or column was not compared
    window: str = ""  # which requests were judged: time range, versions, rows (the report says it)

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "drift_share": self.drift_share,
            "drifted_columns": float(self.drifted_columns),
            "current_rows": float(self.current_rows),
        }
        for group in self.groups:
            metrics[f"drift_share_{group.group}"] = group.dataset.share
        for c in self.columns:
            metrics[f"drift_score_{c.column}"] = c.score
            metrics[f"drifted_{c.column}"] = float(c.drifted)
        return {k: v for k, v in metrics.items() if not math.isnan(v)}


# ------------------------------------------------------------------------------------------- parsing
def _metric_kind(config: dict[str, Any]) -> str:
    return str(config["type"]).rsplit(":", 1)[-1]


def _failed_tests(snapshot: dict[str, Any]) -> dict[str, bool]:
    """Evidently's per-metric drift tests: metric id -> drift detected (status FAIL)."""
    verdicts: dict[str, bool] = {}
    for test in snapshot.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        if _metric_kind(params) == "ValueDrift":
            verdicts[test["metric_config"]["metric_id"]] = test["status"] == "FAIL"
    return verdicts


def parse_snapshot(snapshot: dict[str, Any], group: str) -> tuple[DatasetDrift, tuple[ColumnDrift, ...]]:
    """Typed results of a drift snapshot, dispatched on each metric's type; other types are ignored.
    The dataset's count and share are counted from the per-column rows, never read from another test."""
    tests = _failed_tests(snapshot)
    columns: list[ColumnDrift] = []

    def value_drift(metric: dict[str, Any]) -> None:
        config = metric["config"]
        if metric["id"] not in tests:
            raise ValueError(f"Evidently snapshot has no drift test for column {config['column']!r}")
        columns.append(
            ColumnDrift(
                column=config["column"],
                method=str(config["method"]),
                score=float(metric["value"]),
                threshold=float(config["threshold"]),
                drifted=tests[metric["id"]],
                group=group,
            )
        )

    parsers: dict[str, Callable[[dict[str, Any]], None]] = {"ValueDrift": value_drift}
    for metric in snapshot["metrics"]:
        parser = parsers.get(_metric_kind(metric["config"]))
        if parser is not None:
            parser(metric)
    ordered = tuple(sorted(columns, key=lambda c: c.column))
    return DatasetDrift.of(ordered), ordered


# ------------------------------------------------------------------------------------------ the report
def resolve_method(numerical: bool, reference: pd.Series, spec: DriftSpec) -> tuple[str, float]:
    """The drift method of one column and the threshold that fits its kind (p-value or distance).

    ``auto`` follows Evidently's documented rule, resolved here so the spec's thresholds can apply:
    a p-value threshold of 0.05 handed to a distance would silently mean something else."""
    chosen = spec.numerical_method if numerical else spec.categorical_method
    if chosen == "auto":
        small = len(reference) <= _SMALL_REFERENCE
        if numerical:
            chosen = "ks" if small else "wasserstein"
        elif small:
            chosen = "z" if reference.nunique() <= 2 else "chisquare"
        else:
            chosen = "jensenshannon"
    threshold = spec.threshold_for(chosen)
    return chosen, threshold


def evidently_drift(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    spec: DriftSpec,
    out_dir: Path,
    group: str,
) -> tuple[DatasetDrift, tuple[ColumnDrift, ...], Path, Path, list[str]]:
    """One Evidently report over the columns both frames share; HTML + JSON in ``out_dir``."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    notes: list[str] = []
    shared = [c for c in reference.columns if c in current.columns]
    # Non-numeric columns (script, endpoint, ...) are categorical; the rest numeric.
    categorical = [c for c in shared if not pd.api.types.is_numeric_dtype(reference[c])]
    columns: list[str] = []
    for column in shared:
        ref, cur = reference[column], current[column]
        # Constant and equal on both sides: no information, and a normed distance would divide by 0.
        if ref.nunique() <= 1 and cur.nunique() <= 1 and (ref.iloc[0] == cur.iloc[0]):
            value = ref.iloc[0].item() if hasattr(ref.iloc[0], "item") else ref.iloc[0]
            notes.append(f"{group}.{column}: constant {value!r} in reference and current, not compared")
            continue
        columns.append(column)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / f"drift-{group}.html", out_dir / f"drift-{group}.json"
    if not columns:  # nothing varies: no drift to test (Evidently refuses an empty column list)
        notes.append(f"{group}: no column varies, nothing compared")
        json_path.write_text(json.dumps({"metrics": [], "tests": [], "note": notes[-1]}))
        html_path.write_text(f"<html><body><p>{notes[-1]}</p></body></html>")
        return DatasetDrift(0, 0.0), (), html_path, json_path, notes
    numerical = [c for c in columns if c not in categorical]
    definition = DataDefinition(
        numerical_columns=numerical, categorical_columns=[c for c in columns if c in categorical]
    )
    metrics: list = []  # one ValueDrift (one test) per column; the group's count is taken from them
    for column in columns:
        method, threshold = resolve_method(column in numerical, reference[column], spec)
        metrics.append(ValueDrift(column=column, method=method, threshold=threshold))
    cur = current[columns].copy()
    ref = reference[columns].copy()
    cur[numerical], ref[numerical] = cur[numerical].astype(float), ref[numerical].astype(float)
    # Evidently's correlation widgets divide by a zero std for near-constant columns (NaN, harmless).
    with np.errstate(invalid="ignore", divide="ignore"):
        snapshot = Report(metrics, include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))
    dataset, parsed = parse_snapshot(snapshot.dict(), group)
    return dataset, parsed, html_path, json_path, notes


def group_verdict(groups: list[GroupDrift], spec: DriftSpec) -> tuple[Verdict, float, list[str]]:
    """The verdict, the drift share it rests on, and why a group could not decide.

    Only groups compared on at least ``spec.min_columns`` columns decide; one of them drifts when its
    drifted share (from its per-column table) reaches ``spec.max_drift_share``. The share returned is
    the largest among the deciding groups (NaN when none may decide), so the Prometheus gauge and its
    ``>= max_drift_share`` rule agree with the verdict."""
    deciding = [g for g in groups if len(g.columns) >= spec.min_columns]
    notes = [
        f"{g.group}: {len(g.columns)} compared column(s) < drift.min_columns {spec.min_columns}: "
        "reported, but cannot decide drift by itself (LOCKGATE_LOG_TEXT=1 adds text descriptors)"
        for g in groups
        if g not in deciding
    ]
    if not deciding:
        return "insufficient_data", math.nan, notes
    share = max(g.dataset.share for g in deciding)
    return ("drift" if share >= spec.max_drift_share else "no_drift"), share, notes


def drift_report(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    spec: MonitorSpec,
    out_dir: Path,
    baseline: pd.DataFrame | None = None,
) -> DriftResult:
    """Drift of served (ok) requests: prompts vs the reference prompts' features, outputs vs
    ``baseline`` (ok requests of earlier windows; None or too few rows: outputs not compared)."""
    notes: list[str] = []
    if len(current) < spec.min_rows:
        log.warning("monitor: %d logged requests < min_rows %d: no verdict", len(current), spec.min_rows)
        return DriftResult("insufficient_data", math.nan, 0, (), len(current), len(reference), None, None)
    plans: list[tuple[str, str, pd.DataFrame, pd.DataFrame]] = [
        ("prompts", "reference set", prompt_features(current), reference)
    ]
    if baseline is not None and len(baseline) >= spec.min_rows:
        plans.append(("outputs", "baseline window", output_features(current), output_features(baseline)))
    elif baseline is None:
        notes.append(
            "outputs: no baseline window (drift.baseline_windows 0, or a release's canary), not compared"
        )
    else:
        notes.append(
            f"outputs: baseline window has {len(baseline)} requests < min_rows {spec.min_rows}, not compared"
        )
    groups: list[GroupDrift] = []
    for group, source, cur, ref in plans:
        dataset, columns, html, js, skipped = evidently_drift(cur, ref, spec.drift, out_dir, group)
        notes.extend(skipped)
        groups.append(GroupDrift(group, source, len(ref), dataset, columns, html, js))
    verdict, share, deciding_notes = group_verdict(groups, spec.drift)
    notes.extend(deciding_notes)
    all_columns = tuple(c for g in groups for c in g.columns)
    result = DriftResult(
        verdict=verdict,
        drift_share=share,
        drifted_columns=sum(g.dataset.count for g in groups),
        columns=all_columns,
        current_rows=len(current),
        reference_rows=len(reference),
        html_path=groups[0].html_path,
        json_path=groups[0].json_path,
        groups=tuple(groups),
        notes=tuple(notes),
    )
    (out_dir / "verdict.json").write_text(json.dumps(asdict(result), default=str, indent=2))
    log.info(
        "monitor: verdict %s (drift share %.2f, %d drifted columns over %d requests)",
        result.verdict,
        result.drift_share,
        result.drifted_columns,
        len(current),
    )
    return result


def served_traffic(request_log: Path, since: float | None) -> pd.DataFrame:
    """Successful requests logged by the services since ``since`` (unix time)."""
    return served_ok(read_window(request_log, since))


@task(name="monitor")
def monitor_task(
    request_log: Path,
    since: float | None,
    reference_prompts: list[str],
    tokenizer_dir: Path,
    spec: MonitorSpec,
    out_dir: Path,
    parent_run_id: str | None,
    baseline_since: float | None = None,
) -> DriftResult:
    """Validate the window (Great Expectations), then the drift report in a nested MLflow run: HTML and
    JSON as artifacts, shares, per-column scores and verdicts as metrics."""
    import mlflow

    with stage_run(parent_run_id, "monitor"):
        window = read_window(request_log, since)
        if len(window):
            report = validate_window(window, spec)
            mlflow.log_metrics({"window_rows": report.rows, "window_expectations_passed": report.successful})
        current = served_ok(window)
        baseline = None
        if baseline_since is not None and since is not None:
            baseline = served_ok(read_window(request_log, baseline_since, until=since))
            if len(baseline):
                validate_window(baseline, spec)
        reference = reference_prompt_features(reference_prompts, tokenizer_dir)
        result = replace(
            drift_report(current, reference, spec, out_dir, baseline), window=describe_window(window, since)
        )
        mlflow.set_tag("lockgate.monitor_window", result.window)
        mlflow.log_metrics(result.as_metrics())
        mlflow.set_tag("lockgate.drift_verdict", result.verdict)
        for group in result.groups:
            for path in (group.html_path, group.json_path):
                mlflow.log_artifact(str(path), "drift")
        if (out_dir / "verdict.json").exists():
            mlflow.log_artifact(str(out_dir / "verdict.json"), "drift")
    return result


def describe_window(window: pd.DataFrame, since: float | None) -> str:
    """Which live requests a report judged: their time range and the versions (and roles) that served
    them, so a report on live traffic says what it is about."""
    if not len(window):
        return f"no requests since {_utc(since) if since else 'the start of the log'}"
    served = sorted(
        {f"v{v} ({r})" for v, r in zip(window["model_version"], window["service_role"], strict=True)}
    )
    return (
        f"{len(window)} live requests {_utc(float(window['ts'].min()))} .. {_utc(float(window['ts'].max()))}"
        f" served by {', '.join(served)}"
    )


def _utc(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class TextQualityResult:
    drifted: bool
    drifted_metrics: tuple[str, ...]
    current_rows: int
    baseline_rows: int


def text_quality_drift(
    current: pd.DataFrame, baseline: pd.DataFrame | None, min_rows: int
) -> TextQualityResult | None:
    """Chapter 9.4.2's output monitor: text-quality z-scores of this window's outputs vs the baseline
    window's. None (undetermined) without logged output text or with too few rows on either side."""
    from lockgate.tasks.monitoring.detectors import TextQualityMonitor

    if baseline is None or "output" not in current.columns or "output" not in baseline.columns:
        return None
    cur = current["output"].dropna().astype(str).tolist()
    ref = baseline["output"].dropna().astype(str).tolist()
    if len(cur) < min_rows or len(ref) < max(min_rows, 2):
        return None
    monitor = TextQualityMonitor(ref, window=len(cur), min_samples=min(10, len(cur)))
    for text in cur:
        monitor.update(text)
    report = monitor.check()
    return TextQualityResult(report.drifted, report.drifted_features, len(cur), len(ref))
