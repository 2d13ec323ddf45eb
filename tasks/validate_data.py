"""Stage 1: Great Expectations validates every dataset before anything uses it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task

from lockgate.tasks.platform.datasets import REQUIRED_COLUMNS, load_dataset
from lockgate.tasks.platform.errors import DataValidationError
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import DataSpec


@dataclass(frozen=True)
class ValidationReport:
    dataset: str
    rows: int
    evaluated: int
    successful: int


def _expectations(role: str, frame: pd.DataFrame, max_chars: int) -> list:
    import great_expectations.expectations as gxe

    checks: list = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    for column in REQUIRED_COLUMNS[role]:
        checks.append(gxe.ExpectColumnToExist(column=column))
        if column in frame.columns:
            checks.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
            limit = max_chars if column == "prompt" else max(max_chars // 4, 1)
            checks.append(
                gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=limit)
            )
    return checks


def _shorten(value: object, limit: int = 40) -> object:
    text = value if isinstance(value, str) else None
    return text[:limit] + "…" if text is not None and len(text) > limit else value


def _describe(result: dict) -> str:
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    detail = result.get("result") or {}
    where = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    sample = detail.get("partial_unexpected_list")
    counted = detail.get("unexpected_count")
    shown = [_shorten(v) for v in (sample or [])[:3]]
    extra = f" ({counted} unexpected, e.g. {shown!r})" if counted else ""
    observed = detail.get("observed_value")
    extra = extra or (f" (observed {observed!r})" if observed is not None else "")
    return f"{config['type']}({where}) failed{extra}"


def validate_frame(role: str, frame: pd.DataFrame, max_chars: int) -> ValidationReport:
    """Run the role's expectation suite; raise :class:`DataValidationError` naming each failure."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GE logs every ephemeral docs-site folder it creates at INFO; set after import (it configures itself,
    # and the module that logs it sets its own logger to INFO, so the parent's level is not enough).
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        context.data_sources.add_pandas(f"{role}-source")
        .add_dataframe_asset(role)
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{role}-suite"))
    for expectation in _expectations(role, frame, max_chars):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{role}-validation", data=batch_def, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}).to_json_dict()
    failures = [_describe(r) for r in result["results"] if not r["success"]]
    if failures:
        raise DataValidationError(role, failures)
    stats = result["statistics"]
    return ValidationReport(
        role, len(frame), stats["evaluated_expectations"], stats["successful_expectations"]
    )


@dataclass(frozen=True)
class ValidatedData:
    """The spec's datasets after validation, by role."""

    eval: pd.DataFrame
    calibration: pd.DataFrame
    reference: pd.DataFrame
    reports: tuple[ValidationReport, ...]
    train: pd.DataFrame


@task(name="validate-data")
def validate_datasets(data: DataSpec, base_dir: Path, parent_run_id: str | None) -> ValidatedData:
    """Load and validate every dataset; the first failure stops the flow with its expectation named."""
    import mlflow

    frames: dict[str, pd.DataFrame] = {}
    reports: list[ValidationReport] = []
    with stage_run(parent_run_id, "validate-data"):
        for role in ("train", "eval", "calibration", "reference"):
            frame = load_dataset(role, getattr(data, role), base_dir)
            report = validate_frame(role, frame, data.max_prompt_chars)
            mlflow.log_metrics(
                {f"{role}_rows": report.rows, f"{role}_expectations_passed": report.successful}
            )
            frames[role] = frame
            reports.append(report)
    return ValidatedData(
        frames["eval"], frames["calibration"], frames["reference"], tuple(reports), frames["train"]
    )
