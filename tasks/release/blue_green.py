"""Blue-green release: an atomic switch of Production, a bake period against the switched service, an
automatic switch back on failure (section 9.5.1 of the chapter, with the registry as the router).

The "router" is the registry stage: the Production service follows ``models:/NAME/Production`` and
hot-swaps within a poll of a transition (bentos/llm_service.py). So the switch is one
:func:`tasks.platform.model_registry.promote` (the new version enters Production before the old one is
archived —
never a moment with nothing to serve), and the switch back is one
:func:`tasks.platform.model_registry.roll_back_production`. Steps:

1. smoke requests to the new version (green), pinned, before anything changes: any error aborts;
2. a baseline window against Production (blue) — the reference the bake is compared with;
3. the switch, then wait until the Production service answers with the new version ("model loaded");
4. the bake: at least ``bake_requests`` requests and ``bake_s`` seconds against the switched service,
   judged like a canary step (sequential error checks stop it early; latency, length and TTFT at the
   end; inconclusive extends it), plus /readyz health and every answer coming from the new version;
5. on failure, the switch back, and a wait until the service answers with the old version again.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import httpx

from lockgate.bentos.config import ModelUri
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.model_registry import ModelVersionRef
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
    from lockgate.tasks.release.serving import ServiceProcess

log = get_logger(__name__)


def blue_green_launches(
    common: dict[str, object], stable: ModelVersionRef, candidate: ModelVersionRef, spec: CanarySpec
) -> list[dict[str, object]]:
    """The services blue-green needs: Production (following the stage), and green pinned for smoke tests."""
    launches: list[dict[str, object]] = [
        {
            **common,
            "role": "production",
            "model_uri": ModelUri.stage(stable.name, "Production"),
            "registry_poll_s": spec.blue_green.registry_poll_s,
        }
    ]
    if spec.blue_green.pre_switch_requests:
        launches.append({**common, "role": "green", "model_uri": candidate.uri})
    return launches


def release(run: ReleaseRun) -> CanaryResult:
    """The blue-green strategy's entry point: serve Production (and green for the smoke test), then
    :func:`run_blue_green`. It applies its registry transitions itself."""
    state = run.state
    launches = blue_green_launches(run.launch, state.stable, state.candidate, run.spec)
    with serve(run, launches) as (services, failed):
        if failed is not None:
            registry.roll_back_candidate(state.candidate, failed, run.trigger)
            return CanaryResult((), "rollback", failed, "blue_green")
        return run_blue_green(
            services, state.stable, state.candidate, run.prompts, run.spec, run.trigger, run.heartbeat
        )


def _wait_for_version(
    client: httpx.Client, url: str, version: str, traffic: ReplayTraffic, spec: CanarySpec
) -> tuple[float, list[Reply]]:
    """Send requests until the service answers with ``version``; returns the wait and the replies."""
    started = time.monotonic()
    replies: list[Reply] = []
    while time.monotonic() - started < spec.blue_green.switch_timeout_s:
        user_id, prompt = traffic.next()
        reply = call(client, url, "canary", prompt, user_id, spec.max_new_tokens)
        replies.append(reply)
        if reply.model_version == version:
            return time.monotonic() - started, replies
        time.sleep(0.1)
    return float("nan"), replies


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def run_blue_green(
    services: list[ServiceProcess],
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    prompts: list[str],
    spec: CanarySpec,
    trigger: str,
    progress: Progress | None = None,
) -> CanaryResult:
    """Switch, bake, and switch back on failure; the registry transitions happen here."""
    report = progress or (lambda _phase: None)
    bg = spec.blue_green
    production = services[0]
    green = services[1] if len(services) > 1 else None
    traffic = ReplayTraffic(prompts, spec.users)
    pacer = Pacer(spec.traffic_per_s)
    with httpx.Client(timeout=60) as client:
        # 1. Smoke test of green, before anything changes.
        if green is not None:
            report("blue-green: smoke test of the new version")
            smoke = [
                call(client, green.url, "canary", p, u, spec.max_new_tokens).outcome
                for u, p in (traffic.next() for _ in range(bg.pre_switch_requests))
            ]
            failed = sum(not o.ok for o in smoke)
            if failed:
                reason = (
                    f"smoke test: {failed}/{len(smoke)} requests to v{candidate.version} failed "
                    "before the switch"
                )
                registry.roll_back_candidate(candidate, reason, trigger)
                return CanaryResult((), "rollback", reason, "blue_green", len(smoke))
        # 2. Baseline window against blue.
        report("blue-green: baseline window")
        baseline: list[Outcome] = []
        for _ in range(bg.baseline_requests):
            pacer.wait()
            user_id, prompt = traffic.next()
            reply = call(client, production.url, "stable", prompt, user_id, spec.max_new_tokens)
            if reply.model_version not in (None, stable.version):
                raise StageFailed(
                    "canary",
                    f"Production serves v{reply.model_version}, not the expected stable v{stable.version}: "
                    "someone else changed Production; blue-green aborted before switching",
                )
            baseline.append(reply.outcome)
        # 3. The switch.
        report("blue-green: switching Production")
        # Tagged before the switch: a release killed from here on is switched back by recovery.
        registry.mark_decision(candidate, registry.BAKING, "blue-green switch; bake not finished", trigger)
        registry.promote(candidate, "blue-green switch; bake not finished", trigger, decision=registry.BAKING)
        switch_s, _ = _wait_for_version(client, production.url, candidate.version, traffic, spec)
        if math.isnan(switch_s):  # the new version never answered
            reason = (
                f"model not loaded: Production service did not serve v{candidate.version} within "
                f"{bg.switch_timeout_s:g}s of the switch"
            )
            return _switch_back(client, production.url, stable, candidate, reason, (), traffic, spec, trigger)
        # 4. The bake.
        step = _bake(client, production.url, candidate, baseline, traffic, pacer, spec, report)
        log_step(step)
        if step.verdict == "fail":
            reason = f"bake: {'; '.join(step.reasons)} ({latency_evidence([step])})"
            return _switch_back(
                client, production.url, stable, candidate, reason, (step,), traffic, spec, trigger, switch_s
            )
    reason = (
        f"bake passed ({step.canary.requests} requests, {step.elapsed_s:.0f}s; {latency_evidence([step])})"
    )
    registry.mark_decision(candidate, "promoted", reason, trigger)
    return CanaryResult(
        (step,), "promote", reason, "blue_green", step.canary.requests, details={"switch_s": switch_s}
    )


def _bake(
    client: httpx.Client,
    url: str,
    candidate: ModelVersionRef,
    baseline: list[Outcome],
    traffic: ReplayTraffic,
    pacer: Pacer,
    spec: CanarySpec,
    report: Progress,
) -> StepResult:
    """The post-switch window, judged against the baseline; extended while inconclusive."""
    bg = spec.blue_green
    analyzer = CanaryAnalyzer(spec.thresholds, spec.analysis, planned_looks=1 + spec.analysis.max_extensions)
    post: list[Outcome] = []
    wrong_version = 0
    unhealthy = 0
    extensions = 0
    started = time.monotonic()
    fed = 0  # baseline outcomes handed to the sequential checks, in proportion to the bake
    failing: tuple[CheckResult, ...] = ()
    while True:
        rounds = 1 + extensions
        report(f"blue-green: bake, round {rounds}")
        while len(post) < bg.bake_requests * rounds or time.monotonic() - started < bg.bake_s * rounds:
            pacer.wait()
            user_id, prompt = traffic.next()
            reply = call(client, url, "canary", prompt, user_id, spec.max_new_tokens)
            post.append(reply.outcome)
            if reply.outcome.ok and reply.model_version != candidate.version:
                wrong_version += 1
            # The baseline was drawn before the switch; pairing it with the bake in order keeps the
            # block e-values valid (block membership never depends on outcomes).
            due = min(len(baseline), round(len(post) * len(baseline) / bg.bake_requests))
            for outcome in baseline[fed:due]:
                analyzer.observe(outcome)
            fed = max(fed, due)
            analyzer.observe(reply.outcome)
            if len(post) % 25 == 0 and not _healthy(client, url):
                unhealthy += 1
            failing = analyzer.sequential_failure()
            if failing:
                break
        serving = _serving_check(post, wrong_version, unhealthy, candidate)
        if failing:  # stopped early: the window checks are reported too, for the record
            checks: tuple[CheckResult, ...] = (*failing, *analyzer.window_checks(post, baseline), serving)
            verdict: Verdict = "fail"
            break
        checks = (*analyzer.judge_window(post, baseline, bg.bake_requests * rounds), serving)
        verdict = combine(checks)
        if verdict != "inconclusive":
            break
        if extensions >= spec.analysis.max_extensions:
            verdict = "fail"  # no verdict within the extension limit is a failure
            break
        extensions += 1
    return StepResult(
        100.0,
        verdict,
        checks,
        window_stats(post),
        window_stats(baseline),
        extensions,
        time.monotonic() - started,
        bool(failing),
    )


def _serving_check(
    post: list[Outcome], wrong_version: int, unhealthy: int, candidate: ModelVersionRef
) -> CheckResult:
    """Health and "model loaded": /readyz stays 200 and every answer comes from the new version."""
    ok = sum(o.ok for o in post)
    bad = wrong_version + unhealthy
    message = f"{wrong_version}/{ok} answers not from v{candidate.version}, {unhealthy} failed /readyz probes"
    return CheckResult("serving", "fail" if bad else "pass", message, float(bad), 0.0, float("nan"), 0.0)


def _switch_back(
    client: httpx.Client,
    url: str,
    stable: ModelVersionRef,
    candidate: ModelVersionRef,
    reason: str,
    steps: tuple[StepResult, ...],
    traffic: ReplayTraffic,
    spec: CanarySpec,
    trigger: str,
    switch_s: float = float("nan"),
) -> CanaryResult:
    """Production back to ``stable`` (one transition), then wait until the service serves it again."""
    log.warning("blue-green: switching back to v%s: %s", stable.version, reason)
    registry.roll_back_production(stable.name, reason, trigger, to_version=stable.version)
    back_s, _ = _wait_for_version(client, url, stable.version, traffic, spec)
    if math.isnan(back_s):
        raise StageFailed(
            "canary",
            f"switched the registry back to v{stable.version}, but the Production service did not serve it "
            f"within {spec.blue_green.switch_timeout_s:g}s",
        )
    requests = sum(s.canary.requests for s in steps)
    return CanaryResult(
        steps,
        "rollback",
        reason,
        "blue_green",
        requests,
        details={"switch_s": switch_s, "switch_back_s": back_s},
    )
