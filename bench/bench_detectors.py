"""Benchmark of the streaming drift detectors: river's ADWIN as ConceptDriftMonitor runs it, and ours.

Prints, and writes as markdown to reports/bench/detectors-cpu.md (with the machine description):
  1. updates/s of river's ADWIN per item, and of ConceptDriftMonitor.update per label (the production
     path: one ADWIN update per feedback label) — interleaved, --repeats rounds, median and spread;
  2. detection delay for a 5 % → 20 % error-rate jump, over --seeds seeded streams;
  3. false alarms over --stationary-items stationary Bernoulli(0.05) items;
  4. a delta sweep: false alarms over --sweep-seeds stationary streams, and the delay.

lockgate had its own ADWIN (pure Python, plus a numba kernel for whole arrays). On the production path
(per label) river's Rust core was ~10x faster than it (2.4 M vs 0.21 M updates/s, median of 5
interleaved rounds on the shared 2-core machine), and nothing in lockgate feeds ADWIN whole arrays, so
the numba path bought nothing: ADWIN is river's now.

Run: .venv/bin/python bench/bench_detectors.py   (a few minutes; --quick for a smoke run)
Timings are wall-clock on a possibly shared machine: compare only numbers from the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from machine_info import cpu_model
from river.drift import ADWIN as RiverADWIN

from lockgate.tasks.monitoring.detectors import ConceptDriftMonitor, MultiScaleDriftDetector

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "reports" / "bench" / "detectors-cpu.md"
CHANGE_AT = 5000  # items of 5 % error before the jump to 20 %


@dataclass(frozen=True)
class Throughput:
    stream: str
    items: int
    river: list[float]  # updates/s per round
    monitor: list[float]  # ConceptDriftMonitor.update labels/s per round


@dataclass(frozen=True)
class Delay:
    seeds: int
    median: float
    p90: float
    maximum: int
    false_alarms_before_change: int
    missed: int


def machine_description() -> list[str]:
    cpu = cpu_model()
    versions = {name: _version(name) for name in ("numpy", "river", "scipy")}
    return [
        f"nproc: {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})",
        f"CPU: {cpu}",
        f"Python: {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()),
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def river_detections(values: list[float], delta: float = 0.002) -> list[int]:
    detector = RiverADWIN(delta=delta)
    update = detector.update
    found = []
    for i, value in enumerate(values):
        update(value)
        if detector.drift_detected:
            found.append(i)
    return found


def monitor_alarms(errors: list[float]) -> int:
    """ADWIN alarms of a ConceptDriftMonitor fed ``errors`` as labelled predictions (1 = wrong)."""
    monitor = ConceptDriftMonitor()
    return sum(monitor.update(int(e), 0).adwin_alarm for e in errors)


def measure_throughput(name: str, stream: np.ndarray, repeats: int) -> Throughput:
    """river per item and the monitor per label, interleaved round by round (machine noise hits both)."""
    values = stream.tolist()
    river, monitor = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        river_detections(values)
        river.append(len(values) / (time.perf_counter() - start))
        start = time.perf_counter()
        monitor_alarms(values)
        monitor.append(len(values) / (time.perf_counter() - start))
    return Throughput(name, len(values), river, monitor)


def error_jump(seed: int, after: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random(CHANGE_AT) < 0.05, rng.random(after) < 0.20]).astype(np.float64)


def measure_delay(seeds: int, after: int = 5000, delta: float = 0.002) -> Delay:
    delays, early, missed = [], 0, 0
    for seed in range(seeds):
        detections = np.array(river_detections(error_jump(seed, after).tolist(), delta), dtype=int)
        early += int(np.sum(detections < CHANGE_AT))
        late = detections[detections >= CHANGE_AT]
        if late.size == 0:
            missed += 1
        else:
            delays.append(int(late[0]) - CHANGE_AT)
    ordered = sorted(delays)
    return Delay(
        seeds=seeds,
        median=statistics.median(ordered) if ordered else float("nan"),
        p90=ordered[int(0.9 * (len(ordered) - 1))] if ordered else float("nan"),
        maximum=max(ordered) if ordered else -1,
        false_alarms_before_change=early,
        missed=missed,
    )


def stationary(seed: int, items: int) -> np.ndarray:
    return (np.random.default_rng(1000 + seed).random(items) < 0.05).astype(np.float64)


def measure_false_alarms(items: int, seeds: int, delta: float) -> list[int]:
    """river ADWIN detections over ``items`` stationary Bernoulli(0.05) items for each seed."""
    return [len(river_detections(stationary(seed, items).tolist(), delta)) for seed in range(seeds)]


def delta_sweep(deltas: tuple[float, ...], items: int, seeds: int, delay_seeds: int) -> list[str]:
    """Markdown rows: δ, streams with ≥ 1 false alarm, total false alarms, delay median / p90."""
    rows = []
    for delta in deltas:
        alarms = measure_false_alarms(items, seeds, delta)
        delay = measure_delay(delay_seeds, delta=delta)
        rows.append(
            f"| {delta:g} | {sum(a > 0 for a in alarms)} / {seeds} | {sum(alarms)} "
            f"| {delay.median:g} | {delay.p90} | {delay.missed} |"
        )
    return rows


def multiscale_rate(items: int) -> float:
    values = np.random.default_rng(0).normal(size=items).tolist()
    detector = MultiScaleDriftDetector()
    start = time.perf_counter()
    for value in values:
        detector.update(value)
    return items / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000, help="stream length for throughput")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best kept)")
    parser.add_argument("--seeds", type=int, default=100, help="streams for the detection delay")
    parser.add_argument("--stationary-items", type=int, default=1_000_000)
    parser.add_argument("--stationary-seeds", type=int, default=10)
    parser.add_argument("--sweep-seeds", type=int, default=20, help="stationary streams per delta")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"markdown result file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    if args.quick:  # smoke run: small sizes, nothing written unless --out is given
        args.items, args.repeats, args.seeds = 100_000, 1, 50
        args.stationary_items, args.stationary_seeds, args.sweep_seeds = 100_000, 1, 2
    elif args.out is None:
        args.out = DEFAULT_OUT

    rng = np.random.default_rng(42)
    n = args.items
    streams = {
        "Bernoulli(0.05), stationary": (rng.random(n) < 0.05).astype(np.float64),
        "Bernoulli 0.05↔0.20, switch every 50k": (
            rng.random(n) < np.where((np.arange(n) // 50_000) % 2 == 0, 0.05, 0.20)
        ).astype(np.float64),
        "N(μ, 1), μ ∈ {0, 0.5, −1} every 20k": rng.normal(np.resize(np.repeat([0.0, 0.5, -1.0], 20_000), n)),
    }
    lines = ["# Drift detectors — CPU benchmark", "", "## Machine", ""]
    lines += [f"- {line}" for line in machine_description()]
    lines += [
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_detectors.py', *(argv or sys.argv[1:])])}`",
        "",
    ]

    lines += [
        f"## ADWIN throughput (river, delta=0.002 per item; ConceptDriftMonitor per label; one core; "
        f"{args.repeats} interleaved rounds)",
        "",
        "| stream | items | river ADWIN upd/s (median, min–max) | monitor labels/s (median, min–max) |",
        "|---|---:|---:|---:|",
    ]

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"

    for name, stream in streams.items():
        result = measure_throughput(name, stream, args.repeats)
        row = f"| {name} | {result.items:,} | {spread(result.river)} | {spread(result.monitor)} |"
        print(row, flush=True)
        lines.append(row)

    delay = measure_delay(args.seeds)
    lines += [
        "",
        f"## Detection delay, error rate 5 % → 20 % at item {CHANGE_AT} ({delay.seeds} seeded streams)",
        "",
        f"- median delay: {delay.median:g} items (goal ≤ 200); p90: {delay.p90} items; max: {delay.maximum}"
        " (checks run every clock = 32 items, so delays move in steps of 32)",
        f"- detections before the change (false alarms): {delay.false_alarms_before_change}; "
        f"changes missed within 5000 items: {delay.missed}",
    ]
    print("\n".join(lines[-3:]), flush=True)

    for delta in (0.002, 1e-4):
        alarms = measure_false_alarms(args.stationary_items, args.stationary_seeds, delta)
        lines += [
            "",
            f"## False alarms on {args.stationary_items:,} stationary Bernoulli(0.05) items, δ = {delta:g}",
            "",
            f"- per seed: {alarms}",
        ]
        print(lines[-1], flush=True)

    lines += [
        "",
        f"## δ sweep: false alarms over {args.sweep_seeds} streams of {args.stationary_items:,} stationary "
        f"items; delay of the 5 % → 20 % jump ({args.seeds} streams)",
        "",
        "| δ | streams with a false alarm | false alarms | median delay | p90 delay | missed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rows = delta_sweep((0.002, 1e-3, 5e-4, 1e-4, 1e-5), args.stationary_items, args.sweep_seeds, args.seeds)
    lines += rows
    print("\n".join(rows), flush=True)

    rate = multiscale_rate(20_000 if not args.quick else 5_000)
    lines += ["", "## Other", "", f"- MultiScaleDriftDetector (defaults): {rate:,.0f} updates/s"]
    print(lines[-1], flush=True)

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
