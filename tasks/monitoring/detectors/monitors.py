"""Windowed drift monitors: per-feature z-scores (chapter 9.4.1), multi-scale detector (exercise 9.4)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lockgate.tasks.monitoring.detectors.statistical import ArrayLike, _as_sample, ks_two_sample, mann_kendall

Severity = Literal["low", "medium", "high", "critical"]
DriftKind = Literal["none", "sudden", "gradual", "undetermined"]


# --------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureDrift:
    """One feature's current window against its reference."""

    name: str
    reference_mean: float
    reference_std: float
    window_mean: float  # NaN until the window has min_samples values
    window_size: int
    z_score: float  # (x̄_window − μ_ref) / (σ_ref / √n): the window mean's z-score under "no drift"
    effect_size: float  # (x̄_window − μ_ref) / σ_ref: the chapter's score, independent of n
    drifted: bool


@dataclass(frozen=True)
class FeatureDriftReport:
    features: tuple[FeatureDrift, ...]

    @property
    def drifted(self) -> bool:
        return any(f.drifted for f in self.features)

    @property
    def drifted_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.drifted)


def _standard_score(diff: float, scale: float) -> float:
    """diff / scale, with a zero scale (constant reference) giving 0 for no change and ±inf otherwise."""
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


class FeatureDriftMonitor:
    """Per-feature mean-shift monitor: reference mean/std, sliding window, z-score alert.

    The chapter scores |x̄ − μ_ref| / σ_ref against a sensitivity of 2, which ignores how many values the
    window mean averages. Here the alert statistic is the z-score of the window mean under H0 (window drawn
    from the reference), z = (x̄ − μ_ref)/(σ_ref/√n), |z| > ``threshold`` (3 → two-sided 0.27 % per check);
    ``min_effect_size`` additionally requires |x̄ − μ_ref|/σ_ref ≥ it (the chapter's rule is
    ``threshold=0, min_effect_size=2``). ``min_std`` floors σ_ref.
    """

    def __init__(
        self,
        reference: Mapping[str, ArrayLike],
        window: int = 1000,
        threshold: float = 3.0,
        min_samples: int = 100,
        min_effect_size: float = 0.0,
        min_std: float = 0.0,
    ) -> None:
        if not reference:
            raise ValueError("reference must name at least one feature")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be in [1, window], got {min_samples!r}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if min_effect_size < 0:
            raise ValueError(f"min_effect_size must be >= 0, got {min_effect_size!r}")
        if min_std < 0:
            raise ValueError(f"min_std must be >= 0, got {min_std!r}")
        self.threshold = float(threshold)
        self.min_samples = int(min_samples)
        self.min_effect_size = float(min_effect_size)
        self._reference: dict[str, tuple[float, float]] = {}
        for name, values in reference.items():
            sample = _as_sample(values, f"reference[{name!r}]", min_size=2)
            # σ floored at min_std: a constant reference would make any later change an infinite z-score.
            self._reference[name] = (float(sample.mean()), max(float(sample.std(ddof=1)), min_std))
        self._windows: dict[str, deque[float]] = {name: deque(maxlen=window) for name in self._reference}

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self._reference)

    def update(self, features: Mapping[str, float]) -> None:
        """Append one observation; features may be a subset of the reference's, never an unknown name."""
        unknown = set(features) - set(self._reference)
        if unknown:
            raise ValueError(f"features has names not in the reference: {sorted(unknown)}")
        for name, value in features.items():
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"features[{name!r}] is not finite: {value!r}")
            self._windows[name].append(number)

    def check(self) -> FeatureDriftReport:
        """Score every feature's current window."""
        return FeatureDriftReport(features=tuple(self._score(name) for name in self._reference))

    def _score(self, name: str) -> FeatureDrift:
        ref_mean, ref_std = self._reference[name]
        window = self._windows[name]
        n = len(window)
        if n < self.min_samples:
            return FeatureDrift(name, ref_mean, ref_std, math.nan, n, 0.0, 0.0, False)
        mean = math.fsum(window) / n
        diff = mean - ref_mean
        z = _standard_score(diff, ref_std / math.sqrt(n))
        effect = _standard_score(diff, ref_std)
        drifted = abs(z) > self.threshold and abs(effect) >= self.min_effect_size
        return FeatureDrift(name, ref_mean, ref_std, mean, n, z, effect, drifted)


# ------------------------------------------------------------------------------------------ multi-scale
@dataclass(frozen=True)
class MultiScaleResult:
    """State of :class:`MultiScaleDriftDetector` after the latest check."""

    n_seen: int
    checked: bool  # False until the long window holds ≥ medium values
    shift_p_value: float  # KS: short window vs the older part of the long window (NaN before a check)
    trend_p_value: float  # Mann-Kendall on the medium window
    alpha_per_check: float
    drifted: bool
    kind: DriftKind
    severity: Severity
    effect_size: float  # (mean(short) − mean(reference)) / std(reference)
    change_index: int | None  # stream index where the fitted change begins (None when not drifted)
    kind_evidence: float  # ChangeFit.evidence (> 0 favours sudden); NaN when not drifted


class MultiScaleDriftDetector:
    """Exercise 9.4: short/medium/long windows, sudden vs gradual drift, graded severity.

    Every ``check_every`` values (once the long window holds ≥ ``medium`` values):

    * shift test — KS of the short window against the *older* part of the long window (the chapter
      compares short with a long window that contains it, which dilutes the difference);
    * trend test — Mann-Kendall on the medium window;
    * automatic sensitivity — both run at α_check = α · check_every / long (Bonferroni over the checks made
      while one long window passes), so checking more often makes each check stricter and the false-alarm
      rate per long-window span stays ≈ α per test.

    Drift = either test significant. Kind (:func:`classify_change`): the long window is fitted by two
    one-change-point models with as many parameters — a *step* (mean a before τ, b after) and a *hinge* (a
    before τ, then a ramp a + s·(t − τ)); their likelihood ratio says 'sudden' or 'gradual' once it is
    decisive, 'undetermined' before (it is re-evaluated at every check, so the kind firms up as values
    arrive). The chapter instead calls "KS fired" sudden and "Mann-Kendall fired" gradual, but a step inside
    the medium window makes Mann-Kendall fire as well, so the test that fired cannot tell them apart.

    Severity, with d = |mean(short) − mean(reference)| / std(reference) (Cohen's effect-size scale):
    'low' when not drifted; else 'medium' for d < 0.5, 'high' for 0.5 ≤ d < 1, 'critical' for d ≥ 1; a
    sudden change is raised one level (capped at 'critical'): the chapter ranks sudden above gradual drift
    since it leaves no time to react. Once drifted, the state stays drifted while the long window still
    holds pre-change values (up to ``long`` values after the change).
    """

    def __init__(
        self,
        short: int = 100,
        medium: int = 500,
        long: int = 2000,
        check_every: int = 50,
        alpha: float = 0.01,
        min_segment: int = 10,
        decisive: float = 12.0,
    ) -> None:
        if not 2 <= short < medium < long:
            raise ValueError(f"need 2 <= short < medium < long, got {short=}, {medium=}, {long=}")
        if not 1 <= check_every <= long:
            raise ValueError(f"check_every must be in [1, long], got {check_every!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not 2 <= min_segment <= short:
            raise ValueError(f"min_segment must be in [2, short], got {min_segment!r}")
        self.short, self.medium, self.long = short, medium, long
        self.check_every = check_every
        self.alpha = alpha
        self.alpha_per_check = alpha * check_every / long
        self.min_segment = min_segment
        if decisive <= 0:
            raise ValueError(f"decisive must be > 0, got {decisive!r}")
        self.decisive = decisive
        self._values: deque[float] = deque(maxlen=long)
        self._n_seen = 0
        self._last = MultiScaleResult(
            n_seen=0,
            checked=False,
            shift_p_value=math.nan,
            trend_p_value=math.nan,
            alpha_per_check=self.alpha_per_check,
            drifted=False,
            kind="none",
            severity="low",
            effect_size=0.0,
            change_index=None,
            kind_evidence=math.nan,
        )

    @property
    def result(self) -> MultiScaleResult:
        return self._last

    def update(self, x: float) -> MultiScaleResult:
        """Add one value; return the latest result (recomputed every ``check_every`` values)."""
        value = float(x)
        if not math.isfinite(value):
            raise ValueError(f"x must be finite, got {x!r}")
        self._values.append(value)
        self._n_seen += 1
        if self._n_seen % self.check_every == 0 and len(self._values) >= self.medium:
            self._last = self._check()
        return self._last

    def _check(self) -> MultiScaleResult:
        values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        recent, reference = values[-self.short :], values[: -self.short]
        shift = ks_two_sample(reference, recent, alpha=self.alpha_per_check)
        trend = mann_kendall(values[-self.medium :], alpha=self.alpha_per_check)
        ref_std = float(reference.std(ddof=1))
        effect = _standard_score(float(recent.mean() - reference.mean()), ref_std)
        drifted = shift.drifted or trend.trend != "none"
        kind: DriftKind = "none"
        change_index: int | None = None
        severity: Severity = "low"
        evidence = math.nan
        if drifted:
            fit = classify_change(values, self.min_segment, self.decisive)
            kind, evidence = fit.kind, fit.evidence
            change_index = self._n_seen - values.size + fit.change_index
            severity = drift_severity(abs(effect), kind)
        return MultiScaleResult(
            n_seen=self._n_seen,
            checked=True,
            shift_p_value=shift.p_value,
            trend_p_value=trend.p_value,
            alpha_per_check=self.alpha_per_check,
            drifted=drifted,
            kind=kind,
            severity=severity,
            effect_size=effect,
            change_index=change_index,
            kind_evidence=evidence,
        )


def drift_severity(effect_size: float, kind: DriftKind) -> Severity:
    """Severity rule of :class:`MultiScaleDriftDetector` (see its docstring); 'low' when kind is 'none'.

    ``effect_size`` is |d| in reference standard deviations; 'undetermined' is graded like 'gradual'.
    """
    if kind == "none":
        return "low"
    levels: tuple[Severity, ...] = ("medium", "high", "critical")
    level = 0 if effect_size < 0.5 else 1 if effect_size < 1.0 else 2
    if kind == "sudden":
        level = min(level + 1, 2)
    return levels[level]


@dataclass(frozen=True)
class ChangeFit:
    """Step-vs-hinge comparison of :func:`classify_change`."""

    kind: Literal["sudden", "gradual", "undetermined"]
    change_index: int  # τ of the better model, an index into the fitted values
    evidence: float  # (RSS_hinge − RSS_step) / σ̂²  ≈ 2·ln(likelihood ratio); > 0 favours a step


def classify_change(values: ArrayLike, min_segment: int = 10, decisive: float = 12.0) -> ChangeFit:
    """Fit a step and a hinge at every change point τ; decide sudden vs gradual by the better fit.

    With prefix sums both fits cost O(n) for all τ:
    step:  RSS(τ) = Σy² − S_pre²/τ − S_post²/(n − τ);
    hinge: y ≈ a + s·h_t, h_t = max(0, t − τ); normal equations [n Σh; Σh Σh²]·[a; s] = [Σy; Σhy],
           RSS(τ) = Σy² − a·Σy − s·Σhy, with Σh = m(m−1)/2, Σh² = (m−1)m(2m−1)/6 (m = n − τ) and
           Σhy = Σ_{t≥τ} t·y_t − τ·Σ_{t≥τ} y_t.
    evidence = (min RSS_hinge − min RSS_step)/σ̂², σ̂² = min RSS/(n − 3): for Gaussian noise ≈ 2·ln LR.
    |evidence| ≥ ``decisive`` (12: past 'very strong', 2·ln B > 10, on Kass & Raftery's 1995 scale) picks
    a kind, else 'undetermined'. Calibration (simulated N(0, 1) windows of 2000, no change): evidence has
    median ≈ 2.4 (the step's free jump fits noise a little better than the continuous hinge) and 99th
    percentile ≈ 9; a 0.8σ step passes 12 within a few hundred values, a ramp of 0.0005σ per value needs
    ≈ 1500 values to pass −12.
    """
    if decisive <= 0:
        raise ValueError(f"decisive must be > 0, got {decisive!r}")
    raw = _as_sample(values, "values", min_size=2 * min_segment)
    y = raw - raw.mean()  # both models have an intercept, so centring changes no RSS but avoids cancellation
    n = y.size
    t = np.arange(n, dtype=np.float64)
    sum_y2 = float(np.dot(y, y))
    prefix_y = np.concatenate(([0.0], np.cumsum(y)))  # prefix_y[k] = Σ_{t<k} y_t
    prefix_ty = np.concatenate(([0.0], np.cumsum(t * y)))
    total_y, total_ty = prefix_y[-1], prefix_ty[-1]

    taus = np.arange(min_segment, n - min_segment + 1, dtype=np.float64)
    pre = prefix_y[min_segment : n - min_segment + 1]
    step_rss = sum_y2 - pre**2 / taus - (total_y - pre) ** 2 / (n - taus)

    m = n - taus  # values from τ on
    sum_h = m * (m - 1.0) / 2.0
    sum_h2 = (m - 1.0) * m * (2.0 * m - 1.0) / 6.0
    sum_hy = (total_ty - prefix_ty[min_segment : n - min_segment + 1]) - taus * (total_y - pre)
    det = n * sum_h2 - sum_h**2
    a = (total_y * sum_h2 - sum_h * sum_hy) / det
    s = (n * sum_hy - sum_h * total_y) / det
    hinge_rss = sum_y2 - a * total_y - s * sum_hy

    best_step, best_hinge = int(np.argmin(step_rss)), int(np.argmin(hinge_rss))
    rss_step, rss_hinge = float(step_rss[best_step]), float(hinge_rss[best_hinge])
    noise = max(min(rss_step, rss_hinge), 0.0) / (n - 3)
    if noise == 0.0:  # a noiseless series: whichever model fits exactly decides
        evidence = math.copysign(math.inf, rss_hinge - rss_step) if rss_hinge != rss_step else 0.0
    else:
        evidence = (rss_hinge - rss_step) / noise
    tau = int(taus[best_step] if evidence > 0 else taus[best_hinge])
    kind: Literal["sudden", "gradual", "undetermined"] = "undetermined"
    if evidence >= decisive:
        kind = "sudden"
    elif evidence <= -decisive:
        kind = "gradual"
    return ChangeFit(kind=kind, change_index=tau, evidence=evidence)
