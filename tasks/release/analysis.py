"""Canary analysis: is the candidate worse than stable, and is the evidence strong enough to act on?

Pure statistics (numpy + scipy), no I/O: the canary, blue-green and shadow strategies feed it
:class:`Outcome` records and act on its :class:`CheckResult` verdicts.

Two kinds of checks share one false-rollback budget ``alpha`` (Bonferroni over the six checks):

* **Sequential checks** (error rate vs stable, success-rate floor, empty-answer rate vs stable) are
  evaluated after every request, so a clearly bad canary is stopped mid-step. Each is an *e-process*
  (a nonnegative supermartingale under the null hypothesis), so by Ville's inequality
  ``P(sup_t E_t >= 1/a) <= a`` however often it is looked at: repeated looks do not inflate false
  rollbacks, and ``1 / max E`` is an always-valid p-value (Johari et al., "Always Valid Inference",
  2017/2022; Ramdas et al., "Game-theoretic statistics and safe anytime-valid inference", 2023).

  - Two proportions (H0: p_canary <= p_stable, p_stable unknown): the exact e-variable of Turner, Ly &
    Grünwald ("Generic E-variables for exact sequential k-sample tests", 2024) for a block holding
    canary and stable observations: alternative probabilities (q_c, q_s) fixed before the block, null
    at their pooled mean q0 = (n_c q_c + n_s q_s) / (n_c + n_s) (the reverse information projection).
    Its expectation is <= 1 for every p_canary <= p_stable (AM-GM, see :func:`_block_log_factor`),
    for any sample size: no normal approximation, which matters for 1 % error rates. The e-process
    is an average over alternatives q_c = q_s + Δ (Δ on a doubling grid from the spec's tolerance)
    plus a plug-in component that follows the observed canary rate — a discrete mixture SPRT: near
    Wald's SPRT efficiency at any of the grid effects, at a cost of log(1/w) nats for the effect's
    prior weight w. The prior (``analysis.mixture_prior``) is *geometric* by default: each doubling
    of Δ halves the weight (the plug-in weighs as much as the smallest effect). Small effects are the
    slow ones to detect and gain most from weight; a large effect earns evidence so fast that the
    extra log(2) per doubling costs it a request or two. Measured over 200 simulated canaries
    (reports/bench/canary-analysis-cpu.md), geometric vs uniform: 1 % → 5 % errors detected after a
    median 170 / p90 317 canary requests vs 180 / 400; 1 % → 50 % median 7 either way.
  - Success-rate floor (H0: p_error <= 1 - min_success_rate): the one-sample Bernoulli mixture SPRT,
    same grid-plus-plug-in construction.

* **Window checks** (latency, output length, time to first token) run at each step's end on that
  step's window: Mann-Whitney U (Kayenta's default judge) plus a minimum effect size (Hodges-Lehmann
  ratio, p95 ratio, relative change of mean output tokens). The chapter's "p > 0.05 means no
  significant difference" is the rule, at a level split over the planned looks (Bonferroni), so a
  five-step plan with two extensions cannot turn a 5 % test into a ~30 % false-rollback rate.

A check **fails** only with both statistical support and an effect beyond its spec threshold; it is
**inconclusive** when the effect is beyond the threshold without enough support yet (for sequential
checks: evidence at least ``1/sqrt(level)``, half way on the log scale), so the step is held and its
window extended; otherwise it **passes**. ``bench/bench_canary_analysis.py`` measures the resulting
detection delays and false-rollback rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from lockgate.flows.spec import CanaryAnalysisSpec, CanarySpec, CanaryThresholds

Target = Literal["stable", "canary"]
Verdict = Literal["pass", "fail", "inconclusive"]
CheckName = Literal[
    "window",  # enough canary requests in the step's window
    "serving",  # blue-green: health and the switched version answering
    "agreement",  # shadow: exact-match agreement with stable
    "error_rate",
    "success_floor",
    "empty_rate",
    "latency",
    "output_tokens",
    "ttft",
]

#: Checks sharing the false-rollback budget; the window check is a data-sufficiency rule, not a test.
TESTED_CHECKS: tuple[CheckName, ...] = (
    "error_rate",
    "success_floor",
    "empty_rate",
    "latency",
    "output_tokens",
    "ttft",
)
#: Fewest values per side before a window check compares distributions (a 4-vs-4 MWU cannot reach
#: p < 0.01 at all: its smallest one-sided p is 1/70).
MIN_SAMPLES = 5
#: Doubling grid of alternatives above the tolerance: 6 points cover a 32x range of effects.
_GRID_POINTS = 6
_Q_MAX = 0.999
_Q_MIN = 1e-6
#: Pairwise differences for the Hodges-Lehmann estimate are capped (stable windows can be large).
_MAX_HL_PAIRS = 400_000


# ------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Outcome:
    """One request as a client saw it."""

    target: Target
    ok: bool
    latency_ms: float
    status_code: int
    output_tokens: int | None = None  # from the response; None when it failed or did not say
    empty: bool | None = None  # a successful answer whose text is blank
    ttft_ms: float | None = None  # server-reported time to first token, where available


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    latency_p50_ms: float
    latency_p95_ms: float
    empty: int = 0
    mean_output_tokens: float = math.nan

    @property
    def success_rate(self) -> float:
        return 1 - self.errors / self.requests if self.requests else math.nan

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


def window_stats(outcomes: Sequence[Outcome]) -> WindowStats:
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_ms for o in ok]
    tokens = [o.output_tokens for o in ok if o.output_tokens is not None]
    return WindowStats(
        requests=len(outcomes),
        errors=len(outcomes) - len(ok),
        latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else math.nan,
        latency_p95_ms=float(np.percentile(latencies, 95)) if latencies else math.nan,
        empty=sum(1 for o in ok if o.empty),
        mean_output_tokens=float(np.mean(tokens)) if tokens else math.nan,
    )


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check, with the numbers behind it (logged to MLflow per step)."""

    name: CheckName
    verdict: Verdict
    message: str
    observed: float  # the effect: a rate difference, a ratio, a relative change
    threshold: float  # the spec's tolerance for ``observed``
    p_value: float  # always-valid (sequential) or Mann-Whitney (window); nan when not tested
    level: float  # the significance level ``p_value`` is compared with
    evidence: float | None = None  # e-value of a sequential check
    n_canary: int = 0
    n_stable: int = 0


def combine(checks: Iterable[CheckResult]) -> Verdict:
    """fail if any check fails, else inconclusive if any is, else pass."""
    verdicts = {c.verdict for c in checks}
    if "fail" in verdicts:
        return "fail"
    return "inconclusive" if "inconclusive" in verdicts else "pass"


# ----------------------------------------------------------------------------------- e-processes
MixturePrior = Literal["geometric", "uniform"]


def mixture_weights(grid_points: int, prior: MixturePrior) -> np.ndarray:
    """Prior weights of ``grid_points`` doubling effects (smallest first) plus the plug-in (last).

    Any weights summing to 1 keep the mixture an e-process (an average of e-processes is one), so the
    prior moves detection delay between effect sizes, never the false-rollback guarantee."""
    if prior == "uniform":
        weights = np.ones(grid_points + 1)
    else:
        weights = np.append(0.5 ** np.arange(grid_points), 0.5)  # the plug-in as the smallest effect
    return weights / weights.sum()


class _Mixture:
    """Weighted average of K e-processes kept as log-products; tracks the running maximum."""

    def __init__(self, weights: np.ndarray) -> None:
        self.log_weights = np.log(weights)
        self.log_components = np.zeros(len(weights))
        self.max_evidence = 1.0

    def multiply(self, log_factors: np.ndarray) -> None:
        self.log_components += log_factors
        self.max_evidence = max(self.max_evidence, self.evidence)

    @property
    def evidence(self) -> float:
        weighted = self.log_components + self.log_weights
        top = float(weighted.max())
        total = float(np.sum(np.exp(weighted - top)))
        return math.exp(min(top + math.log(total), 700.0))

    @property
    def p_value(self) -> float:
        """Always-valid p-value: ``P_H0(p <= a) <= a`` at any stopping time (Ville)."""
        return min(1.0, 1.0 / self.max_evidence)


def effect_grid(tolerance: float) -> np.ndarray:
    """Alternatives Δ = tolerance · 2^j above the null, from the tolerance (at least 0.01) up 32-fold."""
    start = max(tolerance, 0.01)
    return start * 2.0 ** np.arange(_GRID_POINTS)


def _kt(events: float, trials: float) -> float:
    """Krichevsky-Trofimov estimate: a prequential plug-in that is never 0 or 1."""
    return (events + 0.5) / (trials + 1.0)


def _block_log_factor(q_c: np.ndarray, q_s: float, x_c: int, n_c: int, x_s: int, n_s: int) -> np.ndarray:
    """log of the Turner-Ly-Grünwald block e-variable for each alternative q_c (vector).

    Under H0 with p_c <= p_s = p, E[factor] = u_c^{n_c} u_s^{n_s} with u_g linear in p_g and
    (n_c u_c + n_s u_s) / (n_c + n_s) = 1 at p_c = p_s; AM-GM gives <= 1, and q_c >= q0 >= q_s makes
    u_c increasing in p_c, so smaller canary rates only lower it."""
    q0 = (n_c * q_c + n_s * q_s) / (n_c + n_s)
    return (
        x_c * np.log(q_c / q0)
        + (n_c - x_c) * np.log((1 - q_c) / (1 - q0))
        + x_s * np.log(q_s / q0)
        + (n_s - x_s) * np.log((1 - q_s) / (1 - q0))
    )


class TwoProportionEProcess:
    """Always-valid test of H0: p_canary <= p_stable from interleaved Bernoulli observations.

    Observations are grouped in blocks that close as soon as a block holds both a canary and a stable
    observation (membership depends only on routing, never on outcomes, as validity requires). The
    alternatives of a block are computed from earlier blocks only (predictable). Canary observations
    without stable ones wait in the open block (the canary mirrors requests to stable at 100 %)."""

    def __init__(self, tolerance: float, prior: MixturePrior = "geometric") -> None:
        self.deltas = effect_grid(tolerance)
        self.mixture = _Mixture(mixture_weights(len(self.deltas), prior))
        self.events = {"canary": 0, "stable": 0}
        self.trials = {"canary": 0, "stable": 0}
        self._closed = {"canary": [0, 0], "stable": [0, 0]}  # [events, trials] in closed blocks
        self._open = {"canary": [0, 0], "stable": [0, 0]}

    def add(self, target: Target, event: bool) -> None:
        self.events[target] += int(event)
        self.trials[target] += 1
        block = self._open[target]
        block[0] += int(event)
        block[1] += 1
        if self._open["canary"][1] and self._open["stable"][1]:
            self._close_block()

    def _close_block(self) -> None:
        (x_c, n_c), (x_s, n_s) = self._open["canary"], self._open["stable"]
        (ex_c, tr_c), (ex_s, tr_s) = self._closed["canary"], self._closed["stable"]
        q_s = min(max(_kt(ex_s, tr_s), _Q_MIN), _Q_MAX)
        grid = np.minimum(q_s + self.deltas, _Q_MAX)
        plug_in = max(_kt(ex_c, tr_c), q_s)
        q_c = np.maximum(np.append(grid, min(plug_in, _Q_MAX)), q_s)
        self.mixture.multiply(_block_log_factor(q_c, q_s, x_c, n_c, x_s, n_s))
        self._closed["canary"] = [ex_c + x_c, tr_c + n_c]
        self._closed["stable"] = [ex_s + x_s, tr_s + n_s]
        self._open = {"canary": [0, 0], "stable": [0, 0]}

    def rate(self, target: Target) -> float:
        return self.events[target] / self.trials[target] if self.trials[target] else math.nan

    @property
    def difference(self) -> float:
        """Canary rate minus stable rate (maximum-likelihood estimates over everything seen)."""
        if not self.trials["canary"] or not self.trials["stable"]:
            return math.nan
        return self.rate("canary") - self.rate("stable")


class OneProportionEProcess:
    """Always-valid test of H0: p <= p0 (the success-rate floor) from Bernoulli observations.

    For an alternative q >= p0 the factor (q/p0)^x ((1-q)/(1-p0))^(1-x) has expectation
    1 + (p - p0)(q - p0) / (p0 (1 - p0)) <= 1 for every p <= p0."""

    def __init__(self, p0: float, prior: MixturePrior = "geometric") -> None:
        self.p0 = p0
        # Alternatives spread over (p0, 1): 2.5 % ... 80 % of the way from p0 to certain failure.
        self.alternatives = np.minimum(p0 + (1 - p0) * effect_grid(0.025), _Q_MAX)
        self.mixture = _Mixture(mixture_weights(len(self.alternatives), prior))
        self.events = 0
        self.trials = 0

    def add(self, event: bool) -> None:
        q = np.maximum(np.append(self.alternatives, min(_kt(self.events, self.trials), _Q_MAX)), self.p0)
        x = int(event)
        self.mixture.multiply(x * np.log(q / self.p0) + (1 - x) * np.log((1 - q) / (1 - self.p0)))
        self.events += x
        self.trials += 1

    @property
    def rate(self) -> float:
        return self.events / self.trials if self.trials else math.nan


# --------------------------------------------------------------------------------- window tests
def mann_whitney(canary: Sequence[float], stable: Sequence[float], alternative: str) -> float:
    """Mann-Whitney U p-value; 1.0 when every value is tied (no evidence either way)."""
    from scipy.stats import mannwhitneyu

    c, s = np.asarray(canary, dtype=float), np.asarray(stable, dtype=float)
    if np.ptp(np.concatenate([c, s])) == 0:
        return 1.0
    return float(mannwhitneyu(c, s, alternative=alternative, method="asymptotic").pvalue)


def hodges_lehmann(canary: Sequence[float], stable: Sequence[float]) -> float:
    """Median of all pairwise differences canary - stable: the shift estimate that goes with MWU."""
    c, s = np.asarray(canary, dtype=float), np.asarray(stable, dtype=float)
    if c.size * s.size > _MAX_HL_PAIRS:
        # Evenly spaced order statistics keep the stable distribution's shape deterministically.
        keep = max(1, _MAX_HL_PAIRS // c.size)
        s = np.sort(s)[np.linspace(0, s.size - 1, keep).round().astype(int)]
    return float(np.median(np.subtract.outer(c, s)))


# -------------------------------------------------------------------------------------- analyzer
@dataclass
class CanaryAnalyzer:
    """Accumulates outcomes of one release and judges it.

    ``observe`` after every request feeds the sequential checks; ``sequential_failure`` says whether
    to stop now; ``judge_window`` gives a step's checks at its end."""

    thresholds: CanaryThresholds
    analysis: CanaryAnalysisSpec
    planned_looks: int
    errors: TwoProportionEProcess = field(init=False)
    empties: TwoProportionEProcess = field(init=False)
    floor: OneProportionEProcess | None = field(init=False)

    def __post_init__(self) -> None:
        if self.planned_looks < 1:
            raise ValueError(f"planned_looks must be >= 1, got {self.planned_looks}")
        t = self.thresholds
        prior = self.analysis.mixture_prior
        self.errors = TwoProportionEProcess(t.max_error_rate_increase, prior)
        self.empties = TwoProportionEProcess(t.max_empty_rate_increase, prior)
        # A floor of 0 can never be breached; one of 1 is handled by p0 > 0 below.
        p0 = 1 - t.min_success_rate
        self.floor = OneProportionEProcess(max(p0, 1e-9), prior) if p0 < 1 else None

    @classmethod
    def for_spec(cls, spec: CanarySpec, steps: int | None = None) -> CanaryAnalyzer:
        """An analyzer whose window-check level is split over ``steps`` (default: the spec's) steps,
        each with its extensions."""
        looks = (steps if steps is not None else len(spec.steps)) * (1 + spec.analysis.max_extensions)
        return cls(spec.thresholds, spec.analysis, looks)

    @property
    def check_level(self) -> float:
        """Each tested check's share of the false-rollback budget."""
        return self.analysis.alpha / len(TESTED_CHECKS)

    @property
    def look_level(self) -> float:
        """Level of one window test at one look."""
        return self.check_level / self.planned_looks

    def observe(self, outcome: Outcome) -> None:
        self.errors.add(outcome.target, not outcome.ok)
        if outcome.ok and outcome.empty is not None:
            self.empties.add(outcome.target, outcome.empty)
        if outcome.target == "canary" and self.floor is not None:
            self.floor.add(not outcome.ok)

    def observe_all(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.observe(outcome)

    # -- sequential checks ----------------------------------------------------------------------
    def _sequential(
        self, name: CheckName, process: _Mixture, effect: float, tolerance: float, message: str, n: tuple
    ) -> CheckResult:
        level = self.check_level
        breach = not math.isnan(effect) and effect > tolerance
        if breach and process.max_evidence >= 1 / level:
            verdict: Verdict = "fail"
        elif breach and process.max_evidence >= 1 / math.sqrt(level):
            verdict = "inconclusive"
        else:
            verdict = "pass"
        return CheckResult(
            name,
            verdict,
            f"{message} (always-valid p {process.p_value:.3g}, level {level:.3g})",
            effect,
            tolerance,
            process.p_value,
            level,
            process.evidence,
            n[0],
            n[1],
        )

    def sequential_checks(self) -> tuple[CheckResult, ...]:
        t = self.thresholds
        e = self.errors
        checks = [
            self._sequential(
                "error_rate",
                e.mixture,
                e.difference,
                t.max_error_rate_increase,
                f"canary error rate {e.rate('canary'):.3f} (success rate {1 - e.rate('canary'):.3f}) vs "
                f"stable {e.rate('stable'):.3f}: +{e.difference:.3f} (tolerance {t.max_error_rate_increase})",
                (e.trials["canary"], e.trials["stable"]),
            )
        ]
        if self.floor is not None and self.floor.trials:
            f = self.floor
            checks.append(
                self._sequential(
                    "success_floor",
                    f.mixture,
                    f.rate - f.p0,
                    0.0,
                    f"canary success rate {1 - f.rate:.3f} < {t.min_success_rate}"
                    if f.rate > f.p0
                    else f"canary success rate {1 - f.rate:.3f} >= {t.min_success_rate}",
                    (f.trials, 0),
                )
            )
        m = self.empties
        if m.trials["canary"] and m.trials["stable"]:
            checks.append(
                self._sequential(
                    "empty_rate",
                    m.mixture,
                    m.difference,
                    t.max_empty_rate_increase,
                    f"canary empty answers {m.rate('canary'):.3f} vs stable {m.rate('stable'):.3f} "
                    f"(tolerance +{t.max_empty_rate_increase})",
                    (m.trials["canary"], m.trials["stable"]),
                )
            )
        return tuple(checks)

    def sequential_failure(self) -> tuple[CheckResult, ...]:
        """Sequential checks failing now: the canary can be stopped without waiting for the step."""
        processes = [self.errors.mixture, self.empties.mixture]
        if self.floor is not None:
            processes.append(self.floor.mixture)
        if max(p.max_evidence for p in processes) < 1 / self.check_level:
            return ()  # called after every request: skip building messages while nothing can fail
        return tuple(c for c in self.sequential_checks() if c.verdict == "fail")

    # -- window checks --------------------------------------------------------------------------
    def _ratio_check(
        self,
        name: CheckName,
        canary: Sequence[float],
        stable: Sequence[float],
        tolerance: float,
        label: str,
        p95_tolerance: float | None = None,
    ) -> CheckResult:
        level = self.look_level
        # A handful of latencies on a loaded machine tells a slower model from a noisy one no better
        # than a coin: 5 canary vs 23 stable requests once rolled back identical weights at x1.62.
        need = max(MIN_SAMPLES, self.analysis.min_latency_requests)
        if len(canary) < need or len(stable) < need:
            return CheckResult(
                name,
                "pass",
                f"{label} not judged: {len(canary)} canary, {len(stable)} stable successful requests "
                f"(analysis.min_latency_requests: {need} per arm)",
                math.nan,
                tolerance,
                math.nan,
                level,
                n_canary=len(canary),
                n_stable=len(stable),
            )
        # Latencies are compared on the log scale: the shift is then a ratio, robust to scale.
        log_c = np.log(np.maximum(canary, 1e-3))
        log_s = np.log(np.maximum(stable, 1e-3))
        p_value = mann_whitney(log_c, log_s, "greater")
        ratio = math.exp(hodges_lehmann(log_c, log_s))
        significant = p_value < level
        breach = ratio > tolerance
        detail = f"{label} x{ratio:.2f} of stable (tolerance x{tolerance:g}), Mann-Whitney p {p_value:.3g}"
        tail_breach = False
        # The p95 ratio guards the tail, but a p95 of a handful of values is its maximum: only from 40 on.
        if p95_tolerance is not None and len(canary) >= 40:
            p95 = float(np.percentile(canary, 95) / np.percentile(stable, 95))
            tail_breach = p95 > p95_tolerance
            detail += f", p95 x{p95:.2f} (tolerance x{p95_tolerance:g})"
        if significant and (breach or tail_breach):
            verdict: Verdict = "fail"
        elif breach and not significant:
            verdict = "inconclusive"
        else:
            verdict = "pass"
        if verdict != "pass" and self.thresholds.allow_slower_candidate:
            verdict = "pass"
            detail += " — slower allowed, not a rollback reason (canary.thresholds.allow_slower_candidate)"
        return CheckResult(
            name,
            verdict,
            f"{detail}, level {level:.3g}",
            ratio,
            tolerance,
            p_value,
            level,
            n_canary=len(canary),
            n_stable=len(stable),
        )

    def _length_check(self, canary: Sequence[float], stable: Sequence[float]) -> CheckResult:
        tolerance = self.thresholds.max_output_tokens_change
        level = self.look_level
        if len(canary) < MIN_SAMPLES or len(stable) < MIN_SAMPLES:
            return CheckResult(
                "output_tokens",
                "pass",
                f"output tokens: too few values to compare ({len(canary)} canary, {len(stable)} stable)",
                math.nan,
                tolerance,
                math.nan,
                level,
                n_canary=len(canary),
                n_stable=len(stable),
            )
        mean_c, mean_s = float(np.mean(canary)), float(np.mean(stable))
        change = (mean_c / mean_s - 1) if mean_s > 0 else (math.inf if mean_c > 0 else 0.0)
        p_value = mann_whitney(canary, stable, "two-sided")
        significant, breach = p_value < level, abs(change) > tolerance
        verdict: Verdict = "fail" if significant and breach else "inconclusive" if breach else "pass"
        return CheckResult(
            "output_tokens",
            verdict,
            f"mean output tokens {mean_c:.2f} vs stable {mean_s:.2f} ({change:+.0%}, tolerance "
            f"±{tolerance:.0%}), Mann-Whitney p {p_value:.3g}, level {level:.3g}",
            change,
            tolerance,
            p_value,
            level,
            n_canary=len(canary),
            n_stable=len(stable),
        )

    def window_checks(self, canary: Sequence[Outcome], stable: Sequence[Outcome]) -> tuple[CheckResult, ...]:
        """Latency, output length and TTFT of one step's window, canary vs stable."""
        t = self.thresholds
        c_ok = [o for o in canary if o.ok]
        s_ok = [o for o in stable if o.ok]
        checks = [
            self._ratio_check(
                "latency",
                [o.latency_ms for o in c_ok],
                [o.latency_ms for o in s_ok],
                t.max_latency_ratio,
                "latency",
                t.max_latency_p95_ratio,
            ),
            self._length_check(
                [o.output_tokens for o in c_ok if o.output_tokens is not None],
                [o.output_tokens for o in s_ok if o.output_tokens is not None],
            ),
        ]
        c_ttft = [o.ttft_ms for o in c_ok if o.ttft_ms is not None]
        s_ttft = [o.ttft_ms for o in s_ok if o.ttft_ms is not None]
        if c_ttft and s_ttft:  # only where the service reports it
            checks.append(self._ratio_check("ttft", c_ttft, s_ttft, t.max_ttft_ratio, "time to first token"))
        return tuple(checks)

    def judge_window(
        self, canary: Sequence[Outcome], stable: Sequence[Outcome], min_requests: int
    ) -> tuple[CheckResult, ...]:
        """Every check at a step's end: data sufficiency, the sequential checks, the window checks."""
        window = CheckResult(
            "window",
            "inconclusive" if len(canary) < min_requests else "pass",
            f"only {len(canary)} canary requests (< min_requests {min_requests})"
            if len(canary) < min_requests
            else f"{len(canary)} canary requests (>= {min_requests})",
            float(len(canary)),
            float(min_requests),
            math.nan,
            math.nan,
            n_canary=len(canary),
            n_stable=len(stable),
        )
        return (window, *self.sequential_checks(), *self.window_checks(canary, stable))


def interleave(canary: Sequence[Outcome], stable: Sequence[Outcome]) -> list[Outcome]:
    """Merge two arms in proportion (as they would have arrived), for analysing recorded windows."""
    merged: list[Outcome] = []
    n_c, n_s = len(canary), len(stable)
    i = j = 0
    while i < n_c or j < n_s:
        # Take from the arm that is furthest behind its share of the merged sequence.
        if j >= n_s or (i < n_c and (i + 1) / n_c <= (j + 1) / n_s):
            merged.append(canary[i])
            i += 1
        else:
            merged.append(stable[j])
            j += 1
    return merged


def judge_recorded(
    share: float, canary: Sequence[Outcome], stable: Sequence[Outcome], spec: CanarySpec
) -> tuple[Verdict, tuple[CheckResult, ...]]:
    """Judge one recorded window on its own (a fresh analyzer fed both arms in proportion)."""
    analyzer = CanaryAnalyzer.for_spec(spec)
    analyzer.observe_all(interleave(canary, stable))
    step = next((s for s in spec.steps if s.share == share), None)
    min_requests = spec.min_requests(step) if step is not None else spec.min_canary_requests
    checks = analyzer.judge_window(canary, stable, min_requests)
    return combine(checks), checks
