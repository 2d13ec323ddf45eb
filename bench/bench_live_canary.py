"""Live canary: detection on live traffic, false rollbacks, and the router's added latency.

1. Detection at 20 requests/s of sticky users (plus 20 % anonymous requests routed by weight): canary
   requests and seconds from the first canary request until rollback, for error rate 1 % -> 5 %,
   1 % -> 50 % and latency +25 %. Simulated at the request-outcome level on a virtual clock, through
   the live canary's own pieces: routing by ``bentos.rollout.choose_role`` (consistent hash of the user,
   weighted sequence for anonymous requests), each request as a ``LiveRow`` turned into the analysis'
   outcome by ``tasks.release.live.row_outcome``, the ``CanaryAnalyzer`` of the spec, and the step rule
   of ``tasks.release.live`` (settle, window, min requests x rounds, extensions, the stable reference).
   The flow reads the logs every ``live.read_interval_s`` (0.5 s): the decision can come up to that much
   later than the request that decided it — added to the seconds below as a worst case.
2. False rollbacks over ``--aa-runs`` (>= 100) A/A live canaries, same simulation.
3. The router's added latency: a real router process (uvicorn, bentos/router.py, live log on) in front
   of a real backend process answering like the LLM service, vs calling that backend directly;
   sequential requests, direct and routed interleaved, ``--rounds`` rounds. A trivial backend isolates
   what the router adds (an LLM answer would hide it in its own variance).

Usage::

    .venv/bin/python bench/bench_live_canary.py           # -> reports/bench/live-canary-cpu.md
    .venv/bin/python bench/bench_live_canary.py --quick   # smoke run, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
_HOME = Path(tempfile.mkdtemp(prefix="lockgate-bench-live-"))
os.environ.setdefault("LOCKGATE_HOME", str(_HOME / "home"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME / 'mlflow.db'}")

from machine_info import cpu_model  # noqa: E402

from lockgate.bentos.rollout import LiveRow, WeightedSequence, choose_role  # noqa: E402
from lockgate.flows.spec import CanarySpec  # noqa: E402
from lockgate.tasks.release.analysis import CanaryAnalyzer, Outcome, combine  # noqa: E402
from lockgate.tasks.release.canary_strategy import MIN_STABLE_WINDOW  # noqa: E402
from lockgate.tasks.release.live import row_outcome  # noqa: E402

PLAN = {
    "traffic": "live",
    "steps": [5, 10, 25, 50, 100],
    "min_canary_requests": 100,
    "max_requests_per_step": 100_000,
    "live": {"settle_s": 2.5, "read_interval_s": 0.5, "max_wait_s": 3600},
}
RATE_PER_S = 20.0
USERS = 2000
ANONYMOUS = 0.2
BASE_ERROR = 0.01
LATENCY_MS, LATENCY_SIGMA = 25.0, 0.3


@dataclass(frozen=True)
class Version:
    error_rate: float = BASE_ERROR
    latency_factor: float = 1.0


@dataclass(frozen=True)
class Run:
    decision: str
    canary_requests: int  # canary requests until the decision
    seconds: float  # from the first canary request to the decision (virtual clock)
    reason: str


def _row(role: str, version: Version, rng: np.random.Generator, t: float, sticky: bool) -> LiveRow:
    latency = LATENCY_MS * version.latency_factor * math.exp(LATENCY_SIGMA * rng.standard_normal())
    ok = bool(rng.random() >= version.error_rate)
    return LiveRow(
        ts=t,
        request_id="-",
        replica="sim",
        model_name="m",
        version="2" if role == "canary" else "1",
        role=role,  # type: ignore[arg-type]
        sticky=sticky,
        user_hash=None,
        outcome="ok" if ok else ("failover" if role == "canary" else "failed"),
        arm_ok=ok,
        status_code=200 if ok else 500,
        latency_ms=latency,
        total_ms=latency,
        answered_version=None,
        output_tokens=6 if ok else None,
        empty=False if ok else None,
    )


def simulate(canary: Version, seed: int, spec: CanarySpec) -> Run:
    """One live canary at RATE_PER_S on a virtual clock (the step rule of tasks/release/live.py)."""
    rng = np.random.default_rng(seed)
    sequence = WeightedSequence(float(rng.random()))
    analyzer = CanaryAnalyzer.for_spec(spec)
    stable_seen: list[Outcome] = []
    t, first, canary_total = 0.0, None, 0

    def request(share: float) -> Outcome:
        nonlocal t, first, canary_total
        t += 1.0 / RATE_PER_S
        key = None if rng.random() < ANONYMOUS else f"user-{rng.integers(USERS)}"
        role, sticky = choose_role(key, share, sequence)
        outcome = row_outcome(_row(role, canary if role == "canary" else Version(), rng, t, sticky))
        analyzer.observe(outcome)
        if role == "canary":
            canary_total += 1
            first = t if first is None else first
        return outcome

    def done(decision: str, reason: str) -> Run:
        seconds = (t - first) if first is not None else math.nan
        return Run(decision, canary_total, seconds + spec.live.read_interval_s, reason)

    for step in spec.steps:
        need = spec.min_requests(step)
        settle_until = t + spec.live.settle_s
        while t < settle_until:
            request(step.share)
            if analyzer.sequential_failure():
                return done("rollback", "sequential")
        opened, extensions = t, 0
        window_c: list[Outcome] = []
        window_s: list[Outcome] = []
        while True:
            outcome = request(step.share)
            (window_c if outcome.target == "canary" else window_s).append(outcome)
            if analyzer.sequential_failure():
                return done("rollback", "sequential")
            rounds = 1 + extensions
            if len(window_c) >= need * rounds and t - opened >= (step.duration_s or 0) * rounds:
                ok_stable = sum(o.ok for o in window_s)
                reference = window_s if ok_stable >= MIN_STABLE_WINDOW else stable_seen + window_s
                verdict = combine(analyzer.judge_window(window_c, reference, need * rounds))
                if verdict == "pass":
                    break
                if verdict == "fail" or extensions >= spec.analysis.max_extensions:
                    return done("rollback", f"window at {step.share:g}%")
                extensions += 1
        stable_seen.extend(window_s)
    return done("promote", "all steps passed")


def detection(name: str, canary: Version, runs: int, seed: int, spec: CanarySpec) -> dict:
    results = [simulate(canary, seed * 100_000 + i, spec) for i in range(runs)]
    rolled = [r for r in results if r.decision == "rollback"]
    requests = [r.canary_requests for r in rolled]
    seconds = [r.seconds for r in rolled]

    def q(values: list[float], p: float) -> float:
        return float(np.percentile(values, p)) if values else math.nan

    return {
        "scenario": name,
        "runs": runs,
        "rolled_back": len(rolled),
        "req_p50": q(requests, 50),
        "req_p90": q(requests, 90),
        "s_p50": q(seconds, 50),
        "s_p90": q(seconds, 90),
    }


# ------------------------------------------------------------------------------- router overhead
_BACKEND = """
import json
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
BODY = json.dumps({"text": " 5", "output_tokens": 1, "model_version": "1", "time_to_first_token_ms": 1.0})
async def generate(request):
    await request.body()
    return Response(BODY, media_type="application/json")
app = Starlette(routes=[Route("/generate", generate, methods=["POST"])])
"""


def _wait_http(url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def router_overhead(requests: int, rounds: int) -> dict:
    import httpx
    from mlflow import MlflowClient

    from lockgate.tasks.platform import model_registry as registry
    from lockgate.tasks.release.serving import free_port

    work = Path(tempfile.mkdtemp(prefix="lockgate-bench-router-"))
    (work / "stub_backend.py").write_text(_BACKEND)
    client = MlflowClient()
    client.create_registered_model("bench")
    version = client.create_model_version("bench", str(work)).version
    registry.promote_first_production(registry.ModelVersionRef("bench", str(version)), "bench")
    backend_port, router_port = free_port(), free_port()
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--log-level", "warning"]
    backend = subprocess.Popen(
        [*uvicorn, "--port", str(backend_port), "--app-dir", str(work), "stub_backend:app"],
        start_new_session=True,
    )
    env = {
        **os.environ,
        "LOCKGATE_ROUTER_MODEL": "bench",
        "LOCKGATE_ROUTER_REPLICA": "bench",
        "LOCKGATE_ROUTER_BACKENDS": json.dumps({str(version): f"http://127.0.0.1:{backend_port}"}),
        "LOCKGATE_LIVE_LOG_DIR": str(work / "live"),
    }
    router = subprocess.Popen(
        [*uvicorn, "--port", str(router_port), "--factory", "lockgate.bentos.router:create_app"],
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    direct_url, router_url = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{router_port}"
    try:
        _wait_http(direct_url)
        _wait_http(f"{router_url}/livez")
        deadline = time.monotonic() + 30
        while httpx.get(f"{router_url}/readyz", timeout=2).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        body = {"prompt": "Q: what is 2 plus 3?\nA:", "max_new_tokens": 1, "user_id": "u1"}
        per_round = []
        with httpx.Client(timeout=10) as http:
            for _ in range(200):  # warm both paths
                http.post(f"{direct_url}/generate", json=body)
                http.post(f"{router_url}/generate", json=body)
            for r in range(rounds):
                direct, routed = [], []
                for i in range(requests):
                    order = (direct_url, router_url) if (i + r) % 2 == 0 else (router_url, direct_url)
                    for url in order:
                        started = time.perf_counter()
                        answer = http.post(f"{url}/generate", json=body)
                        elapsed = (time.perf_counter() - started) * 1000
                        answer.raise_for_status()
                        (direct if url == direct_url else routed).append(elapsed)
                per_round.append(
                    {
                        "direct_p50": float(np.percentile(direct, 50)),
                        "direct_p99": float(np.percentile(direct, 99)),
                        "router_p50": float(np.percentile(routed, 50)),
                        "router_p99": float(np.percentile(routed, 99)),
                    }
                )
    finally:
        for process in (router, backend):
            process.terminate()
            process.wait(10)
    return {"requests": requests, "rounds": per_round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="canaries per detection scenario")
    parser.add_argument("--aa-runs", type=int, default=200, help="A/A canaries (>= 100)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per path per latency round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--quick", action="store_true", help="small run, prints only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench" / "live-canary-cpu.md")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.aa_runs, args.requests, args.rounds = 10, 10, 200, 1
    spec = CanarySpec.model_validate(PLAN)
    started = time.perf_counter()
    scenarios = [
        detection("errors 1 % -> 5 %", Version(0.05), args.runs, args.seed, spec),
        detection("errors 1 % -> 50 %", Version(0.50), args.runs, args.seed + 1, spec),
        detection("latency +25 %", Version(latency_factor=1.25), args.runs, args.seed + 2, spec),
    ]
    aa = detection("A/A (identical versions)", Version(), args.aa_runs, args.seed + 3, spec)
    sim_s = time.perf_counter() - started
    overhead = router_overhead(args.requests, args.rounds)
    lines = [
        "# Live canary: detection, false rollbacks, router overhead (CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared with other developers), Python "
        f"{platform.python_version()}. Written by `bench/bench_live_canary.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "",
        f"Plan: steps {PLAN['steps']}, {PLAN['min_canary_requests']} canary requests per step window, "
        f"settle {PLAN['live']['settle_s']} s; {RATE_PER_S:g} requests/s, {USERS} sticky users, "
        f"{ANONYMOUS:.0%} anonymous; stable: {BASE_ERROR:.0%} errors, lognormal latency median "
        f"{LATENCY_MS:g} ms. Simulated at the request-outcome level (virtual clock) through the live "
        f"routing and analysis code; seconds include the flow's {PLAN['live']['read_interval_s']} s log "
        f"read interval as a worst case ({sim_s:.0f} s of simulation).",
        "",
        "| scenario | runs | rolled back | canary req. to rollback p50 / p90 | seconds p50 / p90 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in [*scenarios, aa]:
        lines.append(
            f"| {s['scenario']} | {s['runs']} | {s['rolled_back']} ({s['rolled_back'] / s['runs']:.1%}) | "
            f"{s['req_p50']:.0f} / {s['req_p90']:.0f} | {s['s_p50']:.1f} / {s['s_p90']:.1f} |"
        )
    lines += [
        "",
        f"False rollbacks: {aa['rolled_back']} of {aa['runs']} A/A live canaries "
        f"({aa['rolled_back'] / aa['runs']:.1%}; the analysis' budget alpha is "
        f"{spec.analysis.alpha:g}).",
        "",
        "## Router added latency (sequential requests, direct vs routed interleaved)",
        "",
        f"{overhead['requests']} requests per path per round; backend: a Starlette app answering like the "
        "LLM service (so the difference is the router: parsing, routing, one loopback hop, the SQLite row).",
        "",
        "| round | direct p50 | router p50 | added p50 | direct p99 | router p99 | added p99 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(overhead["rounds"], 1):
        lines.append(
            f"| {i} | {r['direct_p50']:.2f} ms | {r['router_p50']:.2f} ms | "
            f"{r['router_p50'] - r['direct_p50']:+.2f} ms | {r['direct_p99']:.2f} ms | "
            f"{r['router_p99']:.2f} ms | {r['router_p99'] - r['direct_p99']:+.2f} ms |"
        )
    added50 = [r["router_p50"] - r["direct_p50"] for r in overhead["rounds"]]
    added99 = [r["router_p99"] - r["direct_p99"] for r in overhead["rounds"]]
    lines += [
        "",
        f"Added latency over rounds: p50 {min(added50):+.2f} … {max(added50):+.2f} ms, "
        f"p99 {min(added99):+.2f} … {max(added99):+.2f} ms (goal: <= 2 ms or <= 5 % of a request).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
