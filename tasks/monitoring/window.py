"""The request-log window the monitor judges: read, validated with Great Expectations, turned into features.

Two kinds of features, each compared with its own reference:

* **prompt side** (what users send): length, token count, character classes, script (a language
  proxy) and offline text descriptors. Reference: the spec's reference prompts, featurised the same way.
* **output side** (what the service did): output tokens, latency and output descriptors. The reference
  set has no outputs or latencies, so these are compared with a *baseline window* of the same log
  (the requests before the current window).

Descriptors are computed here with vectorised pandas string methods, not Evidently's ``Sentiment`` /
``OOVWordsPercentage`` descriptors: those download NLTK data at run time, which an offline host cannot.
Text descriptors need the raw text, which the service logs only with ``LOCKGATE_LOG_TEXT=1``; without
it the descriptor columns are absent and only the numeric request features are compared.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lockgate.tasks.platform.errors import DataValidationError
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from lockgate.flows.spec import MonitorSpec

log = get_logger(__name__)

#: Columns every request-log window must have (bentos/request_log.py's schema).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "ts",
    "request_id",
    "status",
    "prompt_chars",
    "prompt_tokens",
    "output_tokens",
    "latency_ms",
)
STATUSES = ("ok", "error", "rejected")

#: Script buckets of the ``*_script`` categorical column: the dominant Unicode block of the letters.
#: A share of another language shows up as a changed category mix without any language model.
_SCRIPTS: tuple[tuple[str, str], ...] = (
    ("latin", r"[A-Za-z\u00C0-\u024F]"),
    ("cyrillic", r"[\u0400-\u04FF]"),
    ("greek", r"[\u0370-\u03FF]"),
    ("arabic", r"[\u0600-\u06FF]"),
    ("hebrew", r"[\u0590-\u05FF]"),
    ("devanagari", r"[\u0900-\u097F]"),
    ("cjk", r"[\u3040-\u30FF\u4E00-\u9FFF\uAC00-\uD7AF]"),
)
DESCRIPTORS: tuple[str, ...] = (
    "words",
    "mean_word_len",
    "unique_word_ratio",
    "non_ascii_share",
    "digit_share",
    "upper_share",
    "punct_share",
    "space_share",
)


@dataclass(frozen=True)
class WindowValidation:
    rows: int
    evaluated: int
    successful: int


# ------------------------------------------------------------------------------------------ reading
def read_window(request_log: Path, since: float | None, until: float | None = None) -> pd.DataFrame:
    """Every logged request (any status) with ``since <= ts < until``; empty with the log's columns
    when the log does not exist yet (nothing served is not an error)."""
    from lockgate.bentos.request_log import COLUMNS, RequestLog

    if not request_log.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    frame = RequestLog(request_log).read_frame(since=since)
    if until is not None:
        frame = frame[frame["ts"] < until]
    return frame.reset_index(drop=True)


def served_ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"].reset_index(drop=True)


# --------------------------------------------------------------------------------------- validation
def _expectations(frame: pd.DataFrame, spec: MonitorSpec) -> list:
    import great_expectations.expectations as gxe

    checks: list = [gxe.ExpectColumnToExist(column=c) for c in REQUIRED_COLUMNS]
    present = set(frame.columns)
    if {"ts"} <= present:
        checks.append(gxe.ExpectColumnValuesToNotBeNull(column="ts"))
    if {"request_id"} <= present:
        checks.append(gxe.ExpectColumnValuesToNotBeNull(column="request_id"))
    if {"status"} <= present:
        checks.append(gxe.ExpectColumnValuesToBeInSet(column="status", value_set=list(STATUSES)))
    # Served (ok) rows must carry every feature the drift report compares; refused rows have none.
    ok = "status" in present
    for column, upper in (
        ("prompt_chars", None),
        ("prompt_tokens", None),
        ("output_tokens", None),
        ("latency_ms", spec.max_plausible_latency_ms),
    ):
        if column not in present:
            continue
        kwargs = {"row_condition": 'status=="ok"', "condition_parser": "pandas"} if ok else {}
        checks.append(gxe.ExpectColumnValuesToNotBeNull(column=column, **kwargs))
        checks.append(
            gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=upper, **kwargs)
        )
    return checks


def _describe(result: dict) -> str:
    config = result["expectation_config"]
    kwargs = {
        k: v
        for k, v in config["kwargs"].items()
        if k not in ("batch_id", "row_condition", "condition_parser")
    }
    detail = result.get("result") or {}
    where = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    counted = detail.get("unexpected_count")
    sample = (detail.get("partial_unexpected_list") or [])[:3]
    extra = f" ({counted} unexpected, e.g. {sample!r})" if counted else ""
    if not extra and result.get("exception_info", {}).get("raised_exception"):
        extra = f" ({result['exception_info']['exception_message']})"
    return f"{config['type']}({where}) failed{extra}"


def validate_window(frame: pd.DataFrame, spec: MonitorSpec) -> WindowValidation:
    """Great Expectations suite of a request-log window; raises :class:`DataValidationError` naming
    each failing column and expectation (e.g. ``expect_column_values_to_be_between(column=latency_ms,
    ...) failed (3 unexpected, e.g. [-5.0])``). A corrupt window must not produce a drift verdict."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        context.data_sources.add_pandas("request-window-source")
        .add_dataframe_asset("request-window")
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="request-window-suite"))
    for expectation in _expectations(frame, spec):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="request-window-validation", data=batch_def, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}).to_json_dict()
    failures = [_describe(r) for r in result["results"] if not r["success"]]
    if failures:
        raise DataValidationError("request-window", failures)
    stats = result["statistics"]
    return WindowValidation(len(frame), stats["evaluated_expectations"], stats["successful_expectations"])


# ----------------------------------------------------------------------------------------- features
def _share(text: pd.Series, pattern: str, length: pd.Series) -> pd.Series:
    return (text.str.count(pattern) / length.where(length > 0)).fillna(0.0)


def _script(text: pd.Series) -> pd.Series:
    counts = pd.DataFrame({name: text.str.count(pattern) for name, pattern in _SCRIPTS})
    dominant = counts.idxmax(axis=1).astype(object)
    return dominant.where(counts.max(axis=1) > 0, "none")


def text_descriptors(texts: pd.Series, prefix: str) -> pd.DataFrame:
    """Offline descriptors of each text, as ``<prefix>_<descriptor>`` columns plus ``<prefix>_script``."""
    text = texts.fillna("").astype(str)
    chars = text.str.len().astype(float)
    words = text.str.split()
    n_words = words.str.len().astype(float)
    unique = words.map(lambda w: len(set(w))).astype(float)
    columns = {
        "words": n_words,
        "mean_word_len": (text.str.count(r"\S") / n_words.where(n_words > 0)).fillna(0.0),
        "unique_word_ratio": (unique / n_words.where(n_words > 0)).fillna(0.0),
        "non_ascii_share": _share(text, r"[^\x00-\x7F]", chars),
        "digit_share": _share(text, r"\d", chars),
        "upper_share": _share(text, r"[A-Z]", chars),
        "punct_share": _share(text, r"[^\w\s]", chars),
        "space_share": _share(text, r"\s", chars),
    }
    frame = pd.DataFrame({f"{prefix}_{name}": values for name, values in columns.items()}, index=texts.index)
    frame[f"{prefix}_script"] = _script(text)
    return frame


def _has_text(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and len(frame) > 0 and bool(frame[column].notna().all())


def prompt_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Prompt-side features of served requests (descriptors only when every prompt was logged)."""
    features = frame[["prompt_chars", "prompt_tokens"]].astype(float)
    if _has_text(frame, "prompt"):
        features = features.join(text_descriptors(frame["prompt"], "prompt"))
    return features


def output_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Output-side features of served requests (descriptors only when every output was logged)."""
    features = frame[["output_tokens", "latency_ms"]].astype(float)
    if _has_text(frame, "output"):
        features["output_chars"] = frame["output"].astype(str).str.len().astype(float)
        features = features.join(text_descriptors(frame["output"], "output"))
    return features


def reference_prompt_features(prompts: list[str], tokenizer_dir: Path) -> pd.DataFrame:
    """The reference prompts as the service would log them (token counts by the served tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = pd.Series(prompts, dtype=object)
    frame = pd.DataFrame(
        {
            "prompt_chars": texts.str.len().astype(float),
            "prompt_tokens": np.array(
                [len(ids) for ids in tokenizer(list(prompts))["input_ids"]], dtype=float
            ),
        }
    )
    return frame.join(text_descriptors(texts, "prompt"))


def categorical_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith("_script")]
