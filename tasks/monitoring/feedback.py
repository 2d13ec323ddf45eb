"""Feedback labels → concept drift and calibration (chapter 9.4.1), and the temperature that fixes it.

Labels arrive after serving as a CSV (``feedback.file``) with columns ``request_id`` and ``label`` (the
correct answer) and optionally ``confidence`` (the model's probability of its answer) and ``correct``
(0/1, when a human judged the answer directly). Each label is joined to its request-log row; a row is
correct when ``correct`` says so, else when the logged output equals the label after normalisation
(case, surrounding and repeated whitespace). The joined stream, in serving order, feeds
:class:`ConceptDriftMonitor` (sliding-window accuracy + ADWIN); rows with a confidence feed ECE.

The file is re-read in full on every monitor run, so the verdict is a pure function of the file and
the log: nothing to lose on a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from lockgate.tasks.monitoring.detectors import (
    CalibrationResult,
    ConceptDriftMonitor,
    ConceptDriftStatus,
    calibration_error,
)
from lockgate.tasks.platform.errors import DataValidationError
from lockgate.tasks.platform.log import get_logger

if TYPE_CHECKING:
    from lockgate.flows.spec import FeedbackSpec

log = get_logger(__name__)
FeedbackVerdict = Literal["drift", "no_drift", "insufficient_data"]


def feedback_path(spec: FeedbackSpec, pipeline: str, home: Path, base_dir: Path | None = None) -> Path:
    """The spec's file (relative to the spec file's folder) or ``<home>/feedback/<pipeline>.csv``."""
    if spec.file is None:
        return home / "feedback" / f"{pipeline}.csv"
    path = Path(spec.file).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def read_feedback(path: Path) -> pd.DataFrame:
    """The feedback CSV; raises :class:`DataValidationError` naming the column and line at fault."""
    if not path.is_file():
        return pd.DataFrame(columns=["request_id", "label"])
    frame = pd.read_csv(path, dtype={"request_id": str, "label": str}, keep_default_na=False)
    problems = [f"{path}: missing column {c!r}" for c in ("request_id", "label") if c not in frame.columns]
    if problems:
        raise DataValidationError("feedback", problems)
    if "confidence" in frame.columns:
        conf = pd.to_numeric(frame["confidence"].replace("", np.nan), errors="coerce")
        bad = frame.index[conf.notna() & ((conf < 0) | (conf > 1))].tolist()
        bad += frame.index[conf.isna() & (frame["confidence"].astype(str) != "")].tolist()
        if bad:
            lines = ", ".join(str(i + 2) for i in sorted(bad)[:5])  # +2: header line, 1-based
            problems.append(f"{path}: column 'confidence' must be a number in [0, 1] (line {lines})")
        frame["confidence"] = conf
    if "correct" in frame.columns:
        correct = frame["correct"].astype(str).str.strip().str.lower()
        bad = frame.index[~correct.isin(["0", "1", "true", "false", ""])].tolist()
        if bad:
            lines = ", ".join(str(i + 2) for i in bad[:5])
            problems.append(f"{path}: column 'correct' must be 0/1 or true/false (line {lines})")
        frame["correct"] = correct.map({"1": 1.0, "true": 1.0, "0": 0.0, "false": 0.0})
    if problems:
        raise DataValidationError("feedback", problems)
    # A label corrected later wins: keep the last line of each request.
    return frame.drop_duplicates("request_id", keep="last").reset_index(drop=True)


def _normalise(text: pd.Series) -> pd.Series:
    return text.fillna("").astype(str).str.strip().str.casefold().str.replace(r"\s+", " ", regex=True)


def join_feedback(feedback: pd.DataFrame, requests: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Labelled served requests in serving order with a 0/1 ``correct``; and the count left unmatched."""
    columns = ["request_id", "ts", "output"]
    # The service logs its (calibrated) confidence per request; a feedback file may bring its own.
    served_confidence = "confidence" in requests.columns and "confidence" not in feedback.columns
    served = requests[requests["status"] == "ok"][columns + (["confidence"] if served_confidence else [])]
    joined = feedback.merge(served, on="request_id", how="inner").sort_values("ts", kind="stable")
    if served_confidence and joined["confidence"].isna().all():
        joined = joined.drop(columns="confidence")  # logs from before the column existed
    judged = joined["correct"] if "correct" in joined.columns else pd.Series(np.nan, index=joined.index)
    by_text = (_normalise(joined["output"]) == _normalise(joined["label"])).astype(float)
    # Without logged output text only human judgements count (LOCKGATE_LOG_TEXT=1 logs outputs).
    by_text = by_text.where(joined["output"].notna())
    joined["correct"] = judged.fillna(by_text)
    usable = joined[joined["correct"].notna()].reset_index(drop=True)
    return usable, len(feedback) - len(usable)


@dataclass(frozen=True)
class FeedbackResult:
    verdict: FeedbackVerdict
    labels: int
    unmatched: int  # feedback lines with no served request, or no way to judge them
    accuracy: float
    status: ConceptDriftStatus | None  # the monitor's state after the last label
    adwin_detections: int  # ADWIN changes towards *more* errors
    concept_drift: bool
    calibration: CalibrationResult | None
    calibration_drift: bool
    confidence: tuple[float, ...] = ()  # the labelled confidences (for recalibration)
    correct: tuple[float, ...] = ()

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "feedback_labels": float(self.labels),
            "feedback_unmatched": float(self.unmatched),
            "feedback_accuracy": self.accuracy,
            "feedback_adwin_detections": float(self.adwin_detections),
            "concept_drift": float(self.concept_drift),
        }
        if self.status is not None:
            metrics["feedback_window_accuracy"] = self.status.window_accuracy
        if self.calibration is not None:
            metrics["feedback_ece"] = self.calibration.ece
        return {k: v for k, v in metrics.items() if not math.isnan(v)}


def evaluate_feedback(feedback: pd.DataFrame, requests: pd.DataFrame, spec: FeedbackSpec) -> FeedbackResult:
    """Concept drift (window accuracy drop or ADWIN towards more errors) and ECE of the labelled stream."""
    joined, unmatched = join_feedback(feedback, requests)
    n = len(joined)
    if n < spec.min_labels:
        log.info("feedback: %d joined labels < min_labels %d: no verdict", n, spec.min_labels)
        return FeedbackResult("insufficient_data", n, unmatched, math.nan, None, 0, False, None, False)
    monitor = ConceptDriftMonitor(
        window=min(spec.window, n),
        threshold=spec.max_accuracy_drop,
        baseline_accuracy=spec.baseline_accuracy,
        delta=spec.adwin_delta,
    )
    has_conf = "confidence" in joined.columns
    status: ConceptDriftStatus | None = None
    detections = 0
    for row in joined.itertuples(index=False):
        conf = getattr(row, "confidence", None) if has_conf else None
        conf = None if conf is None or (isinstance(conf, float) and math.isnan(conf)) else float(conf)
        status = monitor.update(bool(row.correct), True, confidence=conf)
        baseline_error = 1.0 - status.baseline_accuracy
        # ADWIN alarms on any change; only a change towards more errors is concept drift here.
        if status.adwin_alarm and (math.isnan(baseline_error) or status.error_rate > baseline_error):
            detections += 1
    assert status is not None
    dropped = status.accuracy_change < -spec.max_accuracy_drop  # NaN compares False
    concept = bool(dropped or detections > 0)
    calibration, conf_values, correct_values = None, (), ()
    if has_conf and joined["confidence"].notna().sum() >= spec.min_labels:
        labelled = joined[joined["confidence"].notna()]
        conf_values = tuple(float(v) for v in labelled["confidence"])
        correct_values = tuple(float(v) for v in labelled["correct"])
        calibration = calibration_error(np.array(conf_values), np.array(correct_values))
    calibration_drift = calibration is not None and calibration.ece > spec.max_ece
    result = FeedbackResult(
        verdict="drift" if concept or calibration_drift else "no_drift",
        labels=n,
        unmatched=unmatched,
        accuracy=float(joined["correct"].mean()),
        status=status,
        adwin_detections=detections,
        concept_drift=concept,
        calibration=calibration,
        calibration_drift=calibration_drift,
        confidence=conf_values,
        correct=correct_values,
    )
    log.info(
        "feedback: %d labels, accuracy %.3f (window %.3f vs baseline %.3f), %d ADWIN detections, ECE %s",
        n,
        result.accuracy,
        status.window_accuracy,
        status.baseline_accuracy,
        detections,
        f"{calibration.ece:.3f}" if calibration else "n/a",
    )
    return result


# ------------------------------------------------------------------------------------ recalibration
def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(clipped) - np.log1p(-clipped)


def apply_temperature(confidence: np.ndarray, temperature: float) -> np.ndarray:
    """σ(logit(p) / T): T > 1 softens over-confident answers, T < 1 sharpens under-confident ones."""
    return 1.0 / (1.0 + np.exp(-_logit(np.asarray(confidence, dtype=float)) / temperature))


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(confidence: np.ndarray, correct: np.ndarray) -> TemperatureFit:
    """Temperature scaling (Guo et al. 2017) of the answer confidence, fitted by minimising the
    Bernoulli NLL of ``correct`` over log T ∈ [log 0.05, log 20] (one parameter: bounded search)."""
    from scipy.optimize import minimize_scalar

    conf = np.asarray(confidence, dtype=float)
    y = np.asarray(correct, dtype=float)
    if conf.size < 2:
        raise ValueError(f"temperature scaling needs at least 2 labelled confidences, got {conf.size}")
    fit = minimize_scalar(
        lambda log_t: _nll(apply_temperature(conf, math.exp(log_t)), y),
        bounds=(math.log(0.05), math.log(20.0)),
        method="bounded",
    )
    temperature = float(math.exp(fit.x))
    after = apply_temperature(conf, temperature)
    return TemperatureFit(
        temperature=temperature,
        ece_before=calibration_error(conf, y).ece,
        ece_after=calibration_error(after, y).ece,
        nll_before=_nll(conf, y),
        nll_after=_nll(after, y),
        n=int(conf.size),
    )
