"""Scoring one generated answer against its reference, and bootstrap confidence intervals.

Normalisation follows SQuAD / lm-evaluation-harness: lower case, punctuation and the articles a/an/the
removed, whitespace collapsed. Intervals are percentile bootstraps over rows; a change between two
models on the same rows is resampled *paired* (the same resampled rows for both), which is what makes
a 123-question comparison as tight as it can honestly be.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.split("\n", 1)[0] if stripped else ""


def exact_match_normalised(output: str, answer: str) -> bool:
    return normalise(first_line(output)) == normalise(answer)


def contains(output: str, answer: str) -> bool:
    target = normalise(answer)
    return bool(target) and f" {target} " in f" {normalise(output)} "


def regex_match(output: str, answer: str, pattern: str) -> bool:
    found = re.search(pattern, output)
    if found is None:
        return False
    extracted = found.group(1) if found.groups() else found.group(0)
    return normalise(extracted) == normalise(answer)


def first_number(text: str) -> float | None:
    found = _NUMBER.search(text)
    return float(found.group(0).replace(",", "")) if found else None


def numeric_match(output: str, answer: str, tolerance: float) -> bool:
    got, expected = first_number(output), first_number(str(answer))
    if expected is None:
        raise ValueError(f"numeric metric: answer {answer!r} is not a number")
    return got is not None and abs(got - expected) <= tolerance + 1e-12 * max(1.0, abs(expected))


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` × ``n`` row indices drawn with replacement (one fixed draw shared by all metrics
    of an evaluation, so their intervals are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray, indices: np.ndarray, level: float) -> tuple[float, float]:
    """Interval of the mean of per-row ``values``."""
    return percentile_interval(np.asarray(values, dtype=float)[indices].mean(axis=1), level)


def ratio_interval(
    numerators: np.ndarray, denominators: np.ndarray, indices: np.ndarray, level: float, transform: Callable
) -> tuple[float, float]:
    """Interval of ``transform(sum(num) / sum(den))`` (e.g. perplexity = exp(NLL sum / token count))."""
    num = np.asarray(numerators, dtype=float)[indices].sum(axis=1)
    den = np.maximum(np.asarray(denominators, dtype=float)[indices].sum(axis=1), 1e-12)
    return percentile_interval(transform(num / den), level)


def change_pct_samples(base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-resample percent change candidate vs baseline (0 where both are equal)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.where(base == cand, 0.0, (cand - base) / np.abs(base) * 100)
    return change
