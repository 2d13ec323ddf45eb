"""Canary analysis on simulated canaries: detection delay, false rollbacks, sequential vs fixed window.

No servers: each request's error, latency, output length and emptiness are drawn from distributions,
and the canary runs through the production step logic (``tasks.release.canary_strategy.run_steps``:
sticky routing, extensions and the analyzer), so what is measured is what `lockgate run` decides.

1. Detection delay — canary requests until rollback — for error rate 1 % -> 5 %, 1 % -> 50 % and
   latency +25 %, over ``--runs`` seeded canaries (median, p90, detection rate).
2. False rollbacks over ``--aa-runs`` (>= 200) A/A canaries: identical versions.
3. The sequential error rule vs a fixed-window test at equal error rates: both at the error-rate
   check's level; the fixed window is the smallest N whose power (by simulation, critical value
   calibrated by simulation under H0) matches the sequential rule's detection rate within its
   budget; the ratio is the sequential rule's mean (and median) canary requests over N.
4. The mixture prior of the sequential checks (``analysis.mixture_prior``): the default geometric
   prior vs the uniform one, on the same seeds (A/A and 1 % -> 5 % / 50 % errors).

Usage::

    .venv/bin/python bench/bench_canary_analysis.py          # -> reports/bench/canary-analysis-cpu.md
    .venv/bin/python bench/bench_canary_analysis.py --quick  # smoke run, prints only
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lockgate.flows.spec import CanarySpec  # noqa: E402
from lockgate.tasks.release.analysis import CanaryAnalyzer, Outcome, Target  # noqa: E402
from lockgate.tasks.release.canary_strategy import run_steps  # noqa: E402

#: The bench's plan: the default shares, 100 canary requests per step (500 at most without extensions).
PLAN = {
    "steps": [5, 10, 25, 50, 100],
    "min_canary_requests": 100,
    "max_requests_per_step": 4000,
    "users": 1_000_003,  # prime: round-robin users never lock onto a prompt subset
    "max_new_tokens": 6,
}
BASE_ERROR = 0.01
LATENCY_MS, LATENCY_SIGMA = 25.0, 0.3  # lognormal: median 25 ms, p95 ≈ 41 ms (as measured on loopback)
EMPTY_RATE = 0.005


@dataclass(frozen=True)
class Version:
    error_rate: float = BASE_ERROR
    latency_factor: float = 1.0


def simulated_sender(stable: Version, canary: Version, rng: np.random.Generator):
    """A sender drawing each request's outcome for the version it is routed to."""

    def send(target: Target, _prompt: str, _user: str) -> Outcome:
        v = canary if target == "canary" else stable
        latency = LATENCY_MS * v.latency_factor * math.exp(LATENCY_SIGMA * rng.standard_normal())
        if rng.random() < v.error_rate:
            return Outcome(target, False, latency, 500)
        tokens = 6 if rng.random() < 0.9 else int(rng.integers(1, 6))
        return Outcome(
            target, True, latency, 200, output_tokens=tokens, empty=bool(rng.random() < EMPTY_RATE)
        )

    return send


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    runs: int
    rollbacks: int
    delays: tuple[int, ...]  # canary requests until rollback, per rolled-back run
    seconds: float

    @property
    def rate(self) -> float:
        return self.rollbacks / self.runs

    def quantile(self, q: float) -> float:
        return float(np.percentile(self.delays, q)) if self.delays else math.nan

    def cell(self, q: float) -> str:
        """A delay quantile for the report; '-' when nothing was rolled back."""
        value = self.quantile(q)
        return "-" if math.isnan(value) else f"{value:.0f}"


def goal_verdict(result: ScenarioResult, goal: float, false_rollbacks: bool) -> str:
    """Whether ``result`` meets its goal: a false-rollback rate, or a delay on the median and the p90."""
    if false_rollbacks:
        return "met" if result.rate <= goal else "NOT met"
    median, p90 = result.quantile(50), result.quantile(90)
    return f"median {'met' if median <= goal else 'NOT met'}, p90 {'met' if p90 <= goal else 'NOT met'}"


#: Kept when the report is rewritten: hand-written findings below this line survive a re-run.
NOTES_MARKER = "<!-- notes: kept when bench/bench_canary_analysis.py rewrites this file -->"


def run_scenario(
    name: str, canary: Version, runs: int, seed: int, prior: str = "geometric"
) -> ScenarioResult:
    spec = CanarySpec(**PLAN, analysis={"mixture_prior": prior})
    prompts = ["p"]
    delays: list[int] = []
    started = time.perf_counter()
    for i in range(runs):
        rng = np.random.default_rng([seed, i])
        result = run_steps(simulated_sender(Version(), canary, rng), prompts, spec, verbose=False)
        if result.decision == "rollback":
            delays.append(result.canary_requests)
    return ScenarioResult(name, runs, len(delays), tuple(delays), time.perf_counter() - started)


# ------------------------------------------------------------------- sequential vs fixed window
def sequential_error_delays(
    p_canary: float, share: float, budget: int, runs: int, seed: int
) -> tuple[list[int], float]:
    """Canary requests until the error-rate check fails, at a constant share; (delays, level)."""
    spec = CanarySpec(**PLAN)
    delays: list[int] = []
    level = math.nan
    for i in range(runs):
        rng = np.random.default_rng([seed, i])
        analyzer = CanaryAnalyzer.for_spec(spec)
        level = analyzer.check_level
        n_canary = 0
        while n_canary < budget:
            if rng.random() < share:
                n_canary += 1
                analyzer.observe(Outcome("canary", not rng.random() < p_canary, 1.0, 200))
            else:
                analyzer.observe(Outcome("stable", not rng.random() < BASE_ERROR, 1.0, 200))
            if any(c.name == "error_rate" for c in analyzer.sequential_failure()):
                delays.append(n_canary)
                break
    return delays, level


def fixed_window_n(p_canary: float, share: float, level: float, power: float, seed: int, sims: int) -> int:
    """Smallest canary window N whose one-sided pooled two-proportion z-test, with its critical value
    calibrated by simulation under H0 (both at 1 %), has at least ``power`` (bisection on N)."""
    rng = np.random.default_rng(seed)

    def z_stats(n_c: int, p_c: float) -> np.ndarray:
        n_s = max(1, round(n_c * (1 - share) / share))
        x_c = rng.binomial(n_c, p_c, sims)
        x_s = rng.binomial(n_s, BASE_ERROR, sims)
        pooled = (x_c + x_s) / (n_c + n_s)
        se = np.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_s))
        diff = x_c / n_c - x_s / n_s
        return np.where(se > 0, diff / np.where(se > 0, se, 1), np.where(diff > 0, np.inf, 0.0))

    def power_at(n: int) -> float:
        critical = np.quantile(z_stats(n, BASE_ERROR), 1 - level, method="higher")
        return float(np.mean(z_stats(n, p_canary) > critical))

    lo, hi = 1, 16
    while power_at(hi) < power:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power_at(mid) >= power:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class Comparison:
    name: str
    share: float
    level: float
    detection: float
    seq_mean: float
    seq_median: float
    fixed_n: int

    @property
    def ratio_mean(self) -> float:
        return self.seq_mean / self.fixed_n


def compare(
    name: str, p_canary: float, share: float, budget: int, runs: int, seed: int, sims: int
) -> Comparison:
    delays, level = sequential_error_delays(p_canary, share, budget, runs, seed)
    detection = len(delays) / runs
    # Runs that were not detected within the budget count with the whole budget (an upper bound).
    spent = delays + [budget] * (runs - len(delays))
    # A power of exactly 1 cannot be matched by any finite window: cap the target at 99 % (which
    # favours the fixed window whenever the sequential rule detects more than that).
    fixed = fixed_window_n(p_canary, share, level, min(detection, 0.99), seed, sims)
    return Comparison(name, share, level, detection, float(np.mean(spent)), float(np.median(spent)), fixed)


# ------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} logical CPUs (shared), Python {python}, numpy {np.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="canaries per fault scenario")
    parser.add_argument("--aa-runs", type=int, default=300, help="A/A canaries (>= 200 for the goal)")
    parser.add_argument("--compare-runs", type=int, default=300, help="runs per sequential-vs-fixed case")
    parser.add_argument(
        "--sims", type=int, default=20_000, help="simulations per fixed-window power estimate"
    )
    parser.add_argument("--seed", type=int, default=20240905)
    parser.add_argument("--quick", action="store_true", help="small run, print only")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "reports" / "bench" / "canary-analysis-cpu.md"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.aa_runs, args.compare_runs, args.sims = 30, 40, 40, 4000

    started = time.perf_counter()
    scenarios = [
        ("A/A (identical, 1 % errors)", Version(), args.aa_runs, 0.05),
        ("errors 1 % -> 5 %", Version(error_rate=0.05), args.runs, 300),
        ("errors 1 % -> 50 %", Version(error_rate=0.50), args.runs, 50),
        ("latency +25 %", Version(latency_factor=1.25), args.runs, 500),
    ]
    results = []
    for index, (name, canary, runs, goal) in enumerate(scenarios):
        result = run_scenario(name, canary, runs, args.seed + index)
        results.append((result, goal))
        print(
            f"{name:<28} runs {result.runs:>4}  rolled back {result.rate:6.1%}  delay median "
            f"{result.quantile(50):6.0f}  p90 {result.quantile(90):6.0f}  max {result.quantile(100):6.0f}  "
            f"({result.seconds:.1f}s)  goal: {goal_verdict(result, goal, index == 0)}",
            flush=True,
        )
    comparisons = [
        compare("errors 1 % -> 5 %", 0.05, 0.05, 1000, args.compare_runs, args.seed + 10, args.sims),
        compare("errors 1 % -> 5 %", 0.05, 0.25, 1000, args.compare_runs, args.seed + 11, args.sims),
        compare("errors 1 % -> 50 %", 0.50, 0.05, 1000, args.compare_runs, args.seed + 12, args.sims),
        compare("errors 1 % -> 50 %", 0.50, 0.25, 1000, args.compare_runs, args.seed + 13, args.sims),
    ]
    print("\nsequential rule vs fixed window, same level and power (goal: ratio <= 0.6)")
    for c in comparisons:
        print(
            f"{c.name:<20} share {c.share:4.0%}  level {c.level:.4f}  power {c.detection:6.1%}  "
            f"sequential mean {c.seq_mean:6.1f} median {c.seq_median:6.0f}  fixed N {c.fixed_n:5d}  "
            f"ratio mean {c.ratio_mean:.2f}  median {c.seq_median / c.fixed_n:.2f}",
            flush=True,
        )
    priors = []
    print("\nmixture prior: geometric (default) vs uniform, same seeds")
    for prior in ("geometric", "uniform"):
        for index, (name, canary, runs, _goal) in enumerate(scenarios[:3]):
            result = (
                results[index][0]
                if prior == "geometric"
                else run_scenario(name, canary, runs, args.seed + index, prior)
            )
            priors.append((prior, result))
            print(
                f"{prior:<9} {name:<28} rolled back {result.rate:6.1%}  median {result.quantile(50):5.0f}  "
                f"p90 {result.quantile(90):5.0f}",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f}s")
    if args.quick:
        return
    lines = [
        "# Canary analysis on simulated canaries",
        "",
        f"Machine: {machine()}. Generated by `bench/bench_canary_analysis.py` in {elapsed:.0f} s "
        f"(seed {args.seed}).",
        "",
        f"Plan: steps {PLAN['steps']}, {PLAN['min_canary_requests']} canary requests per step, up to 2 "
        "extensions per inconclusive step, alpha 0.05, geometric mixture prior (spec defaults "
        "otherwise). Stable: 1 % errors, "
        f"lognormal latency (median {LATENCY_MS:g} ms, sigma {LATENCY_SIGMA}), {EMPTY_RATE:.1%} empty "
        "answers, 90 % of answers at the 6-token budget. Delay = canary requests until rollback.",
        "",
        "| scenario | runs | rolled back | delay median | delay p90 | delay max | goal | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for index, (r, goal) in enumerate(results):
        target = f"false rollbacks <= {goal:.0%}" if index == 0 else f"delay <= {goal}"
        lines.append(
            f"| {r.name} | {r.runs} | {r.rate:.1%} | {r.cell(50)} | {r.cell(90)} | {r.cell(100)} | "
            f"{target} | {goal_verdict(r, goal, index == 0)} |"
        )
    lines += [
        "",
        "Sequential error rule vs a fixed-window test at equal error rates: both at the error-rate check's "
        "level; the fixed window is the smallest N with the sequential rule's detection rate (budget 1000 "
        "canary requests; capped at 99 %) as its power; its critical value is calibrated by simulation under "
        "H0. Undetected sequential runs count with the full budget.",
        "",
        "| change | share | level | power | sequential mean | sequential median | fixed N | mean / N "
        "| median / N |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.name} | {c.share:.0%} | {c.level:.4f} | {c.detection:.1%} | {c.seq_mean:.1f} | "
            f"{c.seq_median:.0f} | {c.fixed_n} | {c.ratio_mean:.2f} | {c.seq_median / c.fixed_n:.2f} |"
        )
    lines += [
        "",
        "Mixture prior of the sequential checks (`canary.analysis.mixture_prior`), same seeds: geometric "
        "halves the prior weight per doubling of the effect, uniform weighs the grid's effects equally "
        "(the earlier default).",
        "",
        "| prior | scenario | runs | rolled back | delay median | delay p90 | delay max |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for prior, r in priors:
        lines.append(
            f"| {prior} | {r.name} | {r.runs} | {r.rate:.1%} | {r.cell(50)} | {r.cell(90)} | {r.cell(100)} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.is_file() else ""
    notes = previous[previous.index(NOTES_MARKER) :] if NOTES_MARKER in previous else ""
    args.out.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
