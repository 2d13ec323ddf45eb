"""Shadow release: the candidate gets a copy of every request; users only ever get stable's answer.

Each replayed request goes to stable, whose answer is what the user receives; a copy goes to the
candidate from a small thread pool, so the user never waits for it and a failing candidate cannot
change what a user sees. Both answers are stored side by side and compared — error rate, empty
answers, output length, latency (the same analysis as a canary step) and exact-match agreement — into
``shadow.json`` and ``shadow.html`` (logged to MLflow by the canary task).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from lockgate.tasks.release.analysis import (
    CanaryAnalyzer,
    CheckResult,
    Outcome,
    Verdict,
    combine,
    window_stats,
)
from lockgate.tasks.release.outcome import CanaryResult, Progress, StepResult, latency_evidence, log_step
from lockgate.tasks.release.replay import Pacer, ReplayTraffic, Reply, call
from lockgate.tasks.release.strategy import ReleaseRun, serve

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec


@dataclass(frozen=True)
class ShadowPair:
    """One request with both answers, as the report stores it."""

    user_id: str
    prompt: str
    stable_ok: bool
    stable_text: str | None
    stable_latency_ms: float
    stable_output_tokens: int | None
    candidate_ok: bool
    candidate_text: str | None
    candidate_latency_ms: float
    candidate_output_tokens: int | None
    agree: bool | None  # exact match of the two texts, when both answered


def _pair(user_id: str, prompt: str, stable: Reply, candidate: Reply) -> ShadowPair:
    both = stable.outcome.ok and candidate.outcome.ok
    return ShadowPair(
        user_id,
        prompt,
        stable.outcome.ok,
        stable.text,
        stable.outcome.latency_ms,
        stable.outcome.output_tokens,
        candidate.outcome.ok,
        candidate.text,
        candidate.outcome.latency_ms,
        candidate.outcome.output_tokens,
        (stable.text == candidate.text) if both else None,
    )


def agreement_check(pairs: list[ShadowPair], min_agreement: float | None, level: float) -> CheckResult:
    """Exact-match agreement; with ``min_agreement`` set, fails when it is significantly below it."""
    compared = [p.agree for p in pairs if p.agree is not None]
    agree = sum(bool(a) for a in compared)
    rate = agree / len(compared) if compared else math.nan
    message = f"exact-match agreement {rate:.3f} ({agree}/{len(compared)})"
    if min_agreement is None or not compared:
        return CheckResult("agreement", "pass", message + " (reported only)", rate, math.nan, math.nan, level)
    from scipy.stats import binomtest

    p_value = float(binomtest(agree, len(compared), min_agreement, alternative="less").pvalue)
    verdict: Verdict = "pass"
    if rate < min_agreement:
        verdict = "fail" if p_value < level else "inconclusive"
    return CheckResult(
        "agreement",
        verdict,
        f"{message} vs floor {min_agreement}, binomial p {p_value:.3g}",
        rate,
        min_agreement,
        p_value,
        level,
        n_canary=len(compared),
        n_stable=len(compared),
    )


def release(run: ReleaseRun) -> CanaryResult:
    """The shadow strategy's entry point: serve stable and candidate, then :func:`run_shadow`."""
    state, launch = run.state, run.launch
    launches = [
        {**launch, "role": "stable", "model_uri": state.stable.uri},
        {**launch, "role": "canary", "model_uri": state.candidate.uri},
    ]
    with serve(run, launches) as (services, failed):
        if failed is not None:
            return CanaryResult((), "rollback", failed, "shadow")
        return run_shadow(
            services[0].url, services[1].url, run.prompts, run.spec, run.report_dir, run.heartbeat
        )


def run_shadow(
    stable_url: str,
    candidate_url: str,
    prompts: list[str],
    spec: CanarySpec,
    report_dir: Path,
    progress: Progress | None = None,
) -> CanaryResult:
    """Mirror ``shadow.requests`` requests (more while inconclusive), compare, write the report."""
    report = progress or (lambda _phase: None)
    sh = spec.shadow
    traffic = ReplayTraffic(prompts, spec.users)
    pacer = Pacer(spec.traffic_per_s)
    analyzer = CanaryAnalyzer(spec.thresholds, spec.analysis, planned_looks=1 + spec.analysis.max_extensions)
    pairs: list[ShadowPair] = []
    user_answers: list[Reply] = []
    mirrored_versions: set[str | None] = set()
    started = time.monotonic()
    extensions = 0
    with (
        httpx.Client(timeout=60) as client,
        httpx.Client(timeout=60) as mirror_client,
        ThreadPoolExecutor(sh.mirror_workers, thread_name_prefix="lockgate-shadow") as mirrors,
    ):
        failing: tuple[CheckResult, ...] = ()
        pending: deque[tuple[str, str, Reply, Future[Reply]]] = deque()

        def settle(wait: bool) -> None:
            """Pair up copies that have come back, in order; feed the sequential checks."""
            nonlocal failing
            while pending and not failing and (wait or pending[0][3].done()):
                user_id, prompt, answer, copy = pending.popleft()
                mirrored = copy.result()
                mirrored_versions.add(mirrored.model_version)
                pairs.append(_pair(user_id, prompt, answer, mirrored))
                analyzer.observe(answer.outcome)
                analyzer.observe(mirrored.outcome)
                failing = analyzer.sequential_failure()

        while True:
            rounds = 1 + extensions
            report(f"shadow: mirroring, round {rounds}")
            while len(pairs) + len(pending) < sh.requests * rounds and not failing:
                pacer.wait()
                user_id, prompt = traffic.next()
                # The copy is fired first and never awaited here: the user's answer does not wait for it.
                copy = mirrors.submit(
                    call, mirror_client, candidate_url, "canary", prompt, user_id, spec.max_new_tokens
                )
                answer = call(client, stable_url, "stable", prompt, user_id, spec.max_new_tokens)
                user_answers.append(answer)  # what the user got: always stable's reply
                pending.append((user_id, prompt, answer, copy))
                settle(wait=False)
            settle(wait=True)
            for _, _, _, copy in pending:  # stopped early: the copies in flight are not compared
                copy.result()
            pending.clear()
            canary = [_outcome(p, "canary") for p in pairs]
            stable = [_outcome(p, "stable") for p in pairs]
            agreement = agreement_check(pairs, sh.min_agreement, analyzer.look_level)
            if failing:
                checks = (*failing, *analyzer.window_checks(canary, stable), agreement)
                verdict: Verdict = "fail"
                break
            checks = (*analyzer.judge_window(canary, stable, sh.requests * rounds), agreement)
            verdict = combine(checks)
            if verdict != "inconclusive":
                break
            if extensions >= spec.analysis.max_extensions:
                verdict = "fail"
                break
            extensions += 1
    step = StepResult(
        100.0,
        verdict,
        checks,
        window_stats(canary),
        window_stats(stable),
        extensions,
        time.monotonic() - started,
        bool(failing),
    )
    log_step(step)
    details = {
        "agreement": next(c.observed for c in checks if c.name == "agreement"),
        "user_answers": float(len(user_answers)),
        # Which versions answered users, and which answered the copies: disjoint unless misrouted.
        # (failed requests name no version)
        "user_versions": ",".join(sorted({a.model_version for a in user_answers if a.model_version})),
        "shadow_versions": ",".join(sorted({v for v in mirrored_versions if v})),
    }
    path = write_report(report_dir, pairs, checks, verdict, details)
    decision = "promote" if verdict == "pass" else "rollback"
    reason = f"shadow of {len(pairs)} requests: " + (
        "; ".join(step.reasons) if verdict != "pass" else f"no degradation; {checks[-1].message}"
    )
    reason += f" ({latency_evidence([step])})"
    return CanaryResult((step,), decision, reason, "shadow", len(pairs), str(path), details)


def _outcome(pair: ShadowPair, target: str) -> Outcome:
    """The analysis' view of one side of a pair (empties recomputed from the stored text)."""
    if target == "canary":
        ok, text, latency, tokens = (
            pair.candidate_ok,
            pair.candidate_text,
            pair.candidate_latency_ms,
            pair.candidate_output_tokens,
        )
    else:
        ok, text, latency, tokens = (
            pair.stable_ok,
            pair.stable_text,
            pair.stable_latency_ms,
            pair.stable_output_tokens,
        )
    return Outcome(
        "canary" if target == "canary" else "stable",
        ok,
        latency,
        200 if ok else 0,
        output_tokens=tokens,
        empty=(not text.strip()) if ok and text is not None else None,
    )


def write_report(
    report_dir: Path,
    pairs: list[ShadowPair],
    checks: tuple[CheckResult, ...],
    verdict: Verdict,
    details: dict[str, float | str],
) -> Path:
    """``shadow.json`` (everything) and ``shadow.html`` (summary + side-by-side table); returns the JSON."""
    report_dir.mkdir(parents=True, exist_ok=True)

    def finite(value: object) -> object:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    payload = {
        "verdict": verdict,
        "details": {k: finite(v) for k, v in details.items()},
        "checks": [{k: finite(v) for k, v in asdict(c).items()} for c in checks],
        "pairs": [asdict(p) for p in pairs],
    }
    json_path = report_dir / "shadow.json"
    json_path.write_text(json.dumps(payload, indent=1))
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                p.user_id,
                p.prompt,
                p.stable_text if p.stable_ok else "ERROR",
                p.candidate_text if p.candidate_ok else "ERROR",
                f"{p.stable_latency_ms:.1f}",
                f"{p.candidate_latency_ms:.1f}",
                "" if p.agree is None else ("yes" if p.agree else "no"),
            )
        )
        + "</tr>"
        for p in pairs
    )
    check_rows = "\n".join(
        f"<tr><td>{c.name}</td><td>{c.verdict}</td><td>{html.escape(c.message)}</td></tr>" for c in checks
    )
    (report_dir / "shadow.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>lockgate shadow report</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px;"
        "vertical-align:top;white-space:pre-wrap}table{border-collapse:collapse}</style>"
        f"<h1>Shadow comparison: {html.escape(verdict)}</h1>"
        f"<table><tr><th>check</th><th>verdict</th><th>detail</th></tr>{check_rows}</table>"
        f"<h2>{len(pairs)} requests side by side</h2>"
        "<table><tr><th>user</th><th>prompt</th><th>stable (served)</th><th>candidate (shadow)</th>"
        f"<th>stable ms</th><th>candidate ms</th><th>exact match</th></tr>{rows}</table>\n"
    )
    return json_path
