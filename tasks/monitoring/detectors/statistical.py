"""Two-sample, binned and trend tests for data drift (chapter 9.4.1): KS, KL, PSI, Mann-Kendall."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray

# PSI rule of thumb (N. Siddiqi, "Credit Risk Scorecards", Wiley 2006, ch. 8): < 0.1 no significant shift,
# 0.1–0.25 moderate shift (investigate), ≥ 0.25 significant shift (act).
PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25


@dataclass(frozen=True)
class TestResult:
    """A hypothesis test: statistic, p-value and whether H0 (same distribution) was rejected."""

    __test__ = False  # not a pytest test class despite the name

    statistic: float
    p_value: float
    drifted: bool


@dataclass(frozen=True)
class PsiResult:
    """Population stability index on the reference's quantile bins."""

    psi: float
    level: Literal["stable", "moderate", "significant"]
    bin_edges: tuple[float, ...]  # interior edges; the outer bins are open (−∞, e0) and [e_last, +∞)
    reference_fractions: tuple[float, ...]
    current_fractions: tuple[float, ...]

    @property
    def drifted(self) -> bool:
        """True at the 'significant' level (PSI ≥ 0.25 by default)."""
        return self.level == "significant"


@dataclass(frozen=True)
class MannKendallResult:
    """Mann-Kendall trend test (Mann 1945; Kendall 1975), two-sided."""

    s: int  # S = Σ_{i<j} sign(x_j − x_i)
    variance: float  # Var(S) with tie correction
    z: float
    p_value: float
    tau: float  # Kendall's tau-a = S / (n(n−1)/2)
    trend: Literal["increasing", "decreasing", "none"]


def _as_sample(values: ArrayLike, name: str, min_size: int = 1) -> np.ndarray:
    """1-D finite float array with at least ``min_size`` items, else ValueError naming the argument."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def ks_two_sample(reference: ArrayLike, current: ArrayLike, alpha: float = 0.05) -> TestResult:
    """Two-sample Kolmogorov-Smirnov test, D = sup_x |F_ref(x) − F_cur(x)| (scipy's ``ks_2samp``).

    ``drifted`` is p < alpha (chapter: threshold 0.05). scipy picks the exact null distribution for small
    samples and the asymptotic one otherwise.
    """
    _check_alpha(alpha)
    ref = _as_sample(reference, "reference")
    cur = _as_sample(current, "current")
    result = stats.ks_2samp(ref, cur)
    p_value = float(result.pvalue)
    return TestResult(statistic=float(result.statistic), p_value=p_value, drifted=p_value < alpha)


def _distribution(counts: ArrayLike, name: str, eps: float) -> np.ndarray:
    """Counts → probabilities, smoothed as (p + ε) / (1 + k·ε) so empty bins stay finite and Σ = 1."""
    array = _as_sample(counts, name)
    if np.any(array < 0):
        raise ValueError(f"{name} must be non-negative counts")
    total = array.sum()
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    return (array / total + eps) / (1.0 + eps * array.size)


def kl_divergence(p_counts: ArrayLike, q_counts: ArrayLike, eps: float = 1e-10) -> float:
    """D_KL(P‖Q) = Σ_i P(i) · ln(P(i) / Q(i)) in nats (chapter 9.4.1), P and Q from histogram counts.

    Counts are normalised and smoothed by ``eps`` (see :func:`_distribution`); with ``eps=0`` a bin where
    Q(i) = 0 < P(i) gives +inf, the exact value. Terms with P(i) = 0 contribute 0 (0·ln 0 = 0).
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    p = _distribution(p_counts, "p_counts", eps)
    q = _distribution(q_counts, "q_counts", eps)
    if p.shape != q.shape:
        raise ValueError(f"p_counts and q_counts must have the same length, got {p.size} and {q.size}")
    support = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[support] * np.log(p[support] / q[support])))


def quantile_bin_edges(reference: ArrayLike, bins: int = 10) -> np.ndarray:
    """Interior edges at the reference's 1/bins … (bins−1)/bins quantiles (duplicates from ties removed)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins!r}")
    ref = _as_sample(reference, "reference")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def population_stability_index(
    reference: ArrayLike,
    current: ArrayLike,
    bins: int = 10,
    eps: float = 1e-4,
    moderate: float = PSI_MODERATE,
    significant: float = PSI_SIGNIFICANT,
) -> PsiResult:
    """PSI = Σ_i (c_i − r_i) · ln(c_i / r_i) over shared bins (= D_KL(C‖R) + D_KL(R‖C)).

    Bins are the reference's quantile bins (:func:`quantile_bin_edges`), each holding ≈ 1/bins of the
    reference; bin i is [e_{i−1}, e_i) and the outer bins are open, so current values outside the reference
    range still count. Fractions are smoothed by ``eps`` so an empty bin does not give ±inf.
    Levels: < ``moderate`` (0.1) stable, < ``significant`` (0.25) moderate, else significant.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not 0 < moderate <= significant:
        raise ValueError(f"need 0 < moderate <= significant, got moderate={moderate!r}, {significant=!r}")
    edges = quantile_bin_edges(reference, bins)
    ref = _as_sample(reference, "reference")
    cur = _as_sample(current, "current")
    n_bins = edges.size + 1
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=n_bins)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=n_bins)
    r = _distribution(ref_counts, "reference", eps)
    c = _distribution(cur_counts, "current", eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(c == r, 0.0, (c - r) * np.log(c / r))  # c == r == 0 (eps=0) contributes 0
    psi = float(terms.sum())
    level: Literal["stable", "moderate", "significant"]
    level = "stable" if psi < moderate else "moderate" if psi < significant else "significant"
    return PsiResult(
        psi=psi,
        level=level,
        bin_edges=tuple(float(e) for e in edges),
        reference_fractions=tuple(float(v) for v in ref_counts / ref_counts.sum()),
        current_fractions=tuple(float(v) for v in cur_counts / cur_counts.sum()),
    )


def mann_kendall(values: ArrayLike, alpha: float = 0.05) -> MannKendallResult:
    """Mann-Kendall test for a monotone trend in a series (in time order).

    S = Σ_{i<j} sign(x_j − x_i);  Var(S) = [n(n−1)(2n+5) − Σ_p t_p(t_p−1)(2t_p+5)] / 18  (t_p: size of the
    p-th group of tied values);  z = (S − sign(S)) / √Var(S) (continuity correction);  p = 2·(1 − Φ(|z|)).
    ``trend`` is 'increasing'/'decreasing' when p < alpha. O(n²) time in n vectorised row passes.
    """
    _check_alpha(alpha)
    x = _as_sample(values, "values", min_size=3)
    n = x.size
    s = int(sum(int(np.sign(x[i + 1 :] - x[i]).sum()) for i in range(n - 1)))
    _, tie_sizes = np.unique(x, return_counts=True)
    ties = float(np.sum(tie_sizes * (tie_sizes - 1.0) * (2.0 * tie_sizes + 5.0)))
    variance = (n * (n - 1.0) * (2.0 * n + 5.0) - ties) / 18.0
    # z = 0 when all values are equal (Var = 0) or there is no net ordering (S = 0)
    z = 0.0 if variance <= 0.0 or s == 0 else (s - math.copysign(1.0, s)) / math.sqrt(variance)
    p_value = math.erfc(abs(z) / math.sqrt(2.0))  # two-sided normal tail 2·(1 − Φ(|z|))
    trend: Literal["increasing", "decreasing", "none"] = "none"
    if p_value < alpha:
        trend = "increasing" if z > 0 else "decreasing"
    return MannKendallResult(
        s=s, variance=variance, z=z, p_value=p_value, tau=s / (n * (n - 1) / 2.0), trend=trend
    )
