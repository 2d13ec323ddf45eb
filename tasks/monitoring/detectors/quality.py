"""Prediction-quality monitors (chapter 9.4.1 concept drift, 9.4.2 confidence and output distribution)."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from lockgate.tasks.monitoring.calibration import expected_calibration_error
from lockgate.tasks.monitoring.detectors.monitors import FeatureDriftMonitor, FeatureDriftReport
from lockgate.tasks.monitoring.detectors.statistical import ArrayLike, _as_sample


# ------------------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class CalibrationResult:
    ece: float  # Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|, equal-width bins
    n: int
    bins: int
    accuracy: float
    mean_confidence: float  # > accuracy: over-confident on average


def calibration_error(confidence: ArrayLike, correct: ArrayLike, bins: int = 10) -> CalibrationResult:
    """Expected calibration error (Guo et al. 2017) with M = ``bins`` equal-width confidence bins.

    The ECE itself is :func:`tasks.monitoring.calibration.expected_calibration_error`, the release gate's
    definition, so both always agree.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    conf = _as_sample(confidence, "confidence", min_size=1)
    hits = _as_sample(correct, "correct", min_size=1)
    if conf.shape != hits.shape:
        raise ValueError(f"confidence and correct must have the same length, got {conf.size} and {hits.size}")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence must lie in [0, 1]")
    if np.any((hits != 0) & (hits != 1)):
        raise ValueError("correct must be 0/1 (or bool)")
    return CalibrationResult(
        ece=float(expected_calibration_error(conf, hits, bins)),
        n=int(conf.size),
        bins=bins,
        accuracy=float(hits.mean()),
        mean_confidence=float(conf.mean()),
    )


# ----------------------------------------------------------------------------------------- concept drift
@dataclass(frozen=True)
class ConceptDriftStatus:
    n_seen: int
    window_accuracy: float  # accuracy over the last ``window`` labelled predictions (NaN until full)
    baseline_accuracy: float  # given, or the first full window's accuracy (NaN until then)
    accuracy_change: float  # window − baseline (NaN until both exist)
    window_alarm: bool  # |accuracy_change| > threshold (chapter's sliding-window rule)
    adwin_alarm: bool  # ADWIN on the 0/1 error stream detected a change at this update
    error_rate: float  # ADWIN's estimate of the current error rate (mean of its adaptive window)

    @property
    def drifted(self) -> bool:
        return self.window_alarm or self.adwin_alarm


class ConceptDriftMonitor:
    """Concept drift from feedback labels: sliding-window accuracy (chapter) + ADWIN on the error stream.

    The window rule compares the accuracy of the last ``window`` labels with a baseline (given, e.g. the
    release evaluation's accuracy, or else the first full window) and alarms when they differ by more than
    ``threshold``. ADWIN (``river.drift.ADWIN``, Bifet & Gavaldà 2007, ``delta``) watches the same errors
    with an adaptive window and a bound on its false-alarm rate. ``delta`` defaults to 1e-4, not ADWIN's
    0.002: on 10⁶-item stationary Bernoulli(0.05) error streams δ = 0.002 raised a false alarm in about 1
    stream in 5, δ = 1e-4 in none of 120, while the median delay for a 5 % → 20 % jump went from 119 to
    151 items (bench/bench_detectors.py, reports/bench/detectors-cpu.md). Confidences, when given, are
    kept for :meth:`calibration`.
    """

    def __init__(
        self,
        window: int = 100,
        threshold: float = 0.1,
        baseline_accuracy: float | None = None,
        delta: float = 1e-4,
        calibration_window: int = 1000,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if baseline_accuracy is not None and not 0.0 <= baseline_accuracy <= 1.0:
            raise ValueError(f"baseline_accuracy must be in [0, 1], got {baseline_accuracy!r}")
        if calibration_window < 1:
            raise ValueError(f"calibration_window must be >= 1, got {calibration_window!r}")
        self.window = window
        self.threshold = threshold
        self._baseline = math.nan if baseline_accuracy is None else float(baseline_accuracy)
        self._correct: deque[int] = deque(maxlen=window)
        self._n_correct = 0  # Σ of the window, kept incrementally (exact: integers)
        self._confidence: deque[tuple[float, int]] = deque(maxlen=calibration_window)
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        # river's ADWIN (a Rust core, ~10x our former pure-Python copy per item, the way this monitor calls
        # it). Imported here: river.drift pulls in river's datasets and scikit-learn (seconds), which
        # only a monitor with feedback labels should pay for.
        from river.drift import ADWIN

        self._adwin = ADWIN(delta=delta)
        self._n_seen = 0

    def update(
        self, prediction: object, label: object, confidence: float | None = None
    ) -> ConceptDriftStatus:
        """Record one labelled prediction (correct iff ``prediction == label``); return the status."""
        correct = int(prediction == label)
        if confidence is not None:
            conf = float(confidence)
            if not 0.0 <= conf <= 1.0:
                raise ValueError(f"confidence must be in [0, 1], got {confidence!r}")
            self._confidence.append((conf, correct))
        if len(self._correct) == self.window:
            self._n_correct -= self._correct[0]
        self._correct.append(correct)
        self._n_correct += correct
        self._n_seen += 1
        self._adwin.update(1.0 - correct)
        adwin_alarm = bool(self._adwin.drift_detected)

        accuracy = self._n_correct / self.window if len(self._correct) == self.window else math.nan
        if math.isnan(self._baseline) and not math.isnan(accuracy):
            self._baseline = accuracy  # chapter: the first full window is the baseline
        change = accuracy - self._baseline
        return ConceptDriftStatus(
            n_seen=self._n_seen,
            window_accuracy=accuracy,
            baseline_accuracy=self._baseline,
            accuracy_change=change,
            window_alarm=bool(abs(change) > self.threshold),  # False while either is NaN
            adwin_alarm=adwin_alarm,
            error_rate=float(self._adwin.estimation),
        )

    def calibration(self, bins: int = 10) -> CalibrationResult:
        """ECE over the last ``calibration_window`` predictions that came with a confidence."""
        if not self._confidence:
            raise ValueError("no confidences recorded: pass confidence= to update()")
        conf, correct = zip(*self._confidence, strict=True)
        return calibration_error(np.array(conf), np.array(correct, dtype=np.float64), bins)


# ------------------------------------------------------------------------------------------ text quality
_SENTENCE_END = re.compile(r"[.!?。！？]+")


@dataclass(frozen=True)
class TextQuality:
    """Output-distribution proxies of one generated text (whitespace tokens, as in the chapter)."""

    n_tokens: int
    unique_token_ratio: float  # |distinct tokens| / |tokens|
    distinct_bigram_ratio: float  # |distinct bigrams| / |bigrams| (distinct-2, Li et al. 2016)
    token_entropy: float  # H = −Σ p(w)·log2 p(w) over the text's unigram frequencies, bits
    mean_sentence_length: float  # tokens per non-empty sentence ([.!?。！？] ends a sentence)


TEXT_METRICS: tuple[str, ...] = tuple(f.name for f in fields(TextQuality) if f.name != "n_tokens")


def text_quality(text: str) -> TextQuality:
    """Diversity, repetition, entropy and sentence length of ``text``.

    A ratio whose denominator is 0 (no tokens, or one token for bigrams) is 0.0: empty output is itself a
    degenerate generation. Tokens are case-sensitive whitespace splits (the chapter's ``text.split()``).
    """
    tokens = text.split()
    n = len(tokens)
    counts = Counter(tokens)
    bigrams = list(itertools.pairwise(tokens))
    entropy = 0.0
    if n:
        # H = log2 n − (1/n)·Σ c·log2 c  (same as −Σ p log2 p with p = c/n, fewer divisions)
        entropy = math.log2(n) - math.fsum(c * math.log2(c) for c in counts.values()) / n
    sentences = [s.split() for s in _SENTENCE_END.split(text)]
    lengths = [len(s) for s in sentences if s]
    return TextQuality(
        n_tokens=n,
        unique_token_ratio=len(counts) / n if n else 0.0,
        distinct_bigram_ratio=len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        token_entropy=max(entropy, 0.0),  # −0.0 / rounding for a single repeated token
        mean_sentence_length=sum(lengths) / len(lengths) if lengths else 0.0,
    )


class TextQualityMonitor:
    """Chapter 9.4.2 output monitor: text-quality metrics of recent generations vs reference generations.

    Each metric of :class:`TextQuality` is a feature of a :class:`FeatureDriftMonitor`: reference mean/std
    over ``reference_texts``, mean of the last ``window`` generations, alert when |z| > ``threshold``.
    ``min_std`` floors each reference σ, so a metric that is constant over short reference texts (e.g.
    distinct-2 = 1.0) does not make the first repeated bigram an infinite z-score.
    """

    def __init__(
        self,
        reference_texts: Sequence[str],
        window: int = 20,
        threshold: float = 3.0,
        min_samples: int = 10,
        min_std: float = 0.01,
    ) -> None:
        if len(reference_texts) < 2:
            raise ValueError(f"reference_texts needs at least 2 texts, got {len(reference_texts)}")
        reference = [text_quality(t) for t in reference_texts]
        self._monitor = FeatureDriftMonitor(
            {name: [getattr(q, name) for q in reference] for name in TEXT_METRICS},
            window=window,
            threshold=threshold,
            min_samples=min_samples,
            min_std=min_std,
        )

    def update(self, text: str) -> TextQuality:
        """Score one generation and add it to the window."""
        quality = text_quality(text)
        self._monitor.update({name: getattr(quality, name) for name in TEXT_METRICS})
        return quality

    def check(self) -> FeatureDriftReport:
        """Per-metric drift of the window; ``report.drifted`` is the alert."""
        return self._monitor.check()
