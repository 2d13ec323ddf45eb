"""Release strategies against real services on loopback, with faults built into real models:

* errors on ~20 % of requests: an embedding table cut to the 260 byte-level tokens, so prompts that
  tokenize into BPE merges (2 of the 10 replayed prompts) raise in forward() — a controllable share;
* empty answers: weights that make EOS the first token whatever the prompt (a constant residual
  direction read by the output head) — a broken post-training run in miniature;
* 2x slower: the same model behind a 40 ms batching window (a misconfigured service: every lone
  request waits for company that never comes);
* identical: the stable weights registered again.

Plus blue-green switch/bake/switch-back, shadow traffic, and a real `lockgate run` killed mid-canary
with SIGKILL, then recovered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from conftest import REPO_ROOT, build_tiny_model, run_cli, tiny_release_spec
from lockgate.bentos.config import ServiceConfig
from lockgate.flows.spec import CanarySpec
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.model_registry import ModelVersionRef
from lockgate.tasks.release import lock as release_lock
from lockgate.tasks.release.blue_green import run_blue_green
from lockgate.tasks.release.canary_strategy import run_canary
from lockgate.tasks.release.outcome import apply_decision
from lockgate.tasks.release.serving import ServiceProcess, start_services
from lockgate.tasks.release.shadow import run_shadow

pytestmark = pytest.mark.slow

BYTE_VOCAB = 260  # 4 special tokens + the 256 byte-level tokens of the test tokenizer: no merges
GOOD_PROMPTS = [
    "tell me a joke",
    "hello world",
    "the lazy dog",
    "jump over",
    "quick brown fox",
    "say hi",
    "good morning",
    "big red box",
]
BAD_PROMPTS = ["Q: what is 3 plus 4?\nA:", "Q: what is 12 plus 7?\nA:"]  # contain BPE merges
PROMPTS = GOOD_PROMPTS + BAD_PROMPTS
FAST = ServiceConfig.model_validate({"batching": {"max_latency_ms": 1}, "warmup_requests": 1})
# Slow by waiting 40 ms for a micro-batch to fill: whole-request batching, since the continuous engine
# never waits for others.
SLOW = ServiceConfig.model_validate(
    {"batching": {"engine": "static", "max_latency_ms": 40}, "warmup_requests": 1}
)


def _partial_vocab_copy(source: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    assert all(max(tokenizer(p)["input_ids"]) < BYTE_VOCAB for p in GOOD_PROMPTS)
    assert all(max(tokenizer(p)["input_ids"]) >= BYTE_VOCAB for p in BAD_PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(BYTE_VOCAB)  # also cuts the output head: generated ids stay in range
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _eos_at_once_copy(source: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        # Every token embedding carries +10 on dimension 0, which dominates the residual stream; the
        # output head reads only that dimension, and only for EOS: EOS wins at the first step.
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 100.0
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@dataclass
class Fleet:
    name: str
    refs: dict[str, ModelVersionRef]
    services: dict[str, ServiceProcess]


def _launch(
    role: str, ref: ModelVersionRef, tmp: Path, config: ServiceConfig = FAST, **extra: object
) -> dict:
    return {
        "target": "lockgate.bentos.llm_service:LLMService",
        "role": role,
        "model_uri": ref.uri,
        "request_log": tmp / f"{role}.sqlite",
        "log_dir": tmp / "logs",
        "torch_threads": 1,  # five services share two cores
        "config": config,
        **extra,
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path, tracking: str) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    name = f"strat-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="release-strategies-fleet"):
        refs = {
            "stable": registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"}),
            "identical": registry.log_model_version(tiny_llm_dir, name, {}),
            "errors": registry.log_model_version(_partial_vocab_copy(tiny_llm_dir, tmp / "errors"), name, {}),
            "empty": registry.log_model_version(_eos_at_once_copy(tiny_llm_dir, tmp / "empty"), name, {}),
            "slow": registry.log_model_version(tiny_llm_dir, name, {}),
        }
    registry.promote_first_production(refs["stable"], "test baseline")
    launches = [_launch(role, ref, tmp, SLOW if role == "slow" else FAST) for role, ref in refs.items()]
    services = start_services(launches)
    try:
        yield Fleet(name, refs, {s.role: s for s in services})
    finally:
        for service in services:
            service.stop()


# Five services share two (contended) cores: their relative speed drifts by ~20 %, so the latency
# tolerance is x1.5 here; the slow candidate is ~x2-3.
CANARY = CanarySpec(
    steps=(20, 50, 100),
    min_canary_requests=20,
    users=97,
    max_new_tokens=6,
    thresholds={"max_latency_ratio": 1.5},
)


def test_canary_rolls_back_faulty_candidates_and_promotes_an_identical_one(fleet: Fleet) -> None:
    stable_url = fleet.services["stable"].url
    results = {}
    for role in ("errors", "empty", "slow", "identical"):  # promotion last: it changes Production
        ref = fleet.refs[role]
        registry.stage_candidate(ref, f"test {role}")
        result = run_canary(stable_url, fleet.services[role].url, PROMPTS, CANARY)
        apply_decision(result, ref, CANARY, "test")
        results[role] = result

    errors = results["errors"]
    assert errors.decision == "rollback" and "error_rate" in errors.reason, errors.reason
    first = errors.steps[0]
    # Caught in the first step (usually in an extension of its window: the sequential rule stops it
    # without waiting for the window's end).
    assert len(errors.steps) == 1 and first.canary.errors >= 2 and first.stable.errors == 0
    error_check = next(c for c in first.checks if c.name == "error_rate")
    assert error_check.verdict == "fail" and error_check.observed > 0.05

    empty = results["empty"]
    assert empty.decision == "rollback" and "empty_rate" in empty.reason, empty.reason
    assert empty.steps[-1].stopped_early and empty.canary_requests < 20

    slow = results["slow"]
    assert slow.decision == "rollback" and "latency" in slow.reason, slow.reason
    latency = next(c for c in slow.steps[-1].checks if c.name == "latency")
    assert latency.verdict == "fail" and latency.observed > 1.5  # Hodges-Lehmann ratio, x2-3

    identical = results["identical"]
    assert identical.decision == "promote", identical.reason
    assert [s.verdict for s in identical.steps] == ["pass", "pass", "pass"]

    stages = {
        v.version: (v.stage, v.tags.get(registry.TAG_DECISION)) for v in registry.list_versions(fleet.name)
    }
    refs = fleet.refs
    assert stages == {
        refs["stable"].version: ("Archived", "replaced"),
        refs["identical"].version: ("Production", "promoted"),
        refs["errors"].version: ("Archived", "rolled_back"),
        refs["empty"].version: ("Archived", "rolled_back"),
        refs["slow"].version: ("Archived", "rolled_back"),
    }


def test_shadow_serves_users_from_stable_only_and_reports_side_by_side(fleet: Fleet, tmp_path: Path) -> None:
    spec = CanarySpec(strategy="shadow", shadow={"requests": 40}, users=97, max_new_tokens=6)
    stable, errors = fleet.services["stable"], fleet.services["errors"]
    result = run_shadow(stable.url, errors.url, PROMPTS, spec, tmp_path / "bad")
    assert result.decision == "rollback" and "error_rate" in result.reason, result.reason
    # Users only ever got stable's answers; the copies went to the candidate.
    assert result.details["user_versions"] == fleet.refs["stable"].version
    assert result.details["shadow_versions"] == fleet.refs["errors"].version
    report = json.loads(Path(result.report or "").read_text())
    pairs = report["pairs"]
    assert len(pairs) == result.canary_requests and all(p["stable_ok"] for p in pairs)
    # Exactly the copies of the two merge prompts failed: the 20 % share by design.
    failed = [p["prompt"] for p in pairs if not p["candidate_ok"]]
    assert set(failed) == set(BAD_PROMPTS)
    assert len(failed) == sum(p["prompt"] in BAD_PROMPTS for p in pairs)
    assert "<th>candidate (shadow)</th>" in (tmp_path / "bad" / "shadow.html").read_text()

    # Copies run at the same time as the users' requests, on two contended cores: latency is not what
    # this comparison is about (the canary test covers latency faults).
    strict = CanarySpec(
        strategy="shadow",
        shadow={"requests": 30, "min_agreement": 0.9},
        thresholds={"max_latency_ratio": 3.0},
        users=97,
    )
    same = run_shadow(stable.url, fleet.services["identical"].url, PROMPTS, strict, tmp_path / "same")
    assert same.decision == "promote", same.reason
    assert same.details["agreement"] == 1.0  # greedy decoding, same weights: the same text


def test_blue_green_switches_bakes_and_switches_back(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    name = f"bg-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="blue-green-test"):
        v1 = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        v2 = registry.log_model_version(build_tiny_model(tmp_path / "v2", seed=0), name, {})
        v3 = registry.log_model_version(_partial_vocab_copy(tiny_llm_dir, tmp_path / "v3"), name, {})
    registry.promote_first_production(v1, "test baseline")
    spec = CanarySpec(
        strategy="blue_green",
        blue_green={"pre_switch_requests": 0, "baseline_requests": 30, "bake_requests": 40, "bake_s": 1},
        # The bake compares windows before and after a hot swap on a shared 2-core machine: latencies
        # drift ~20 % between them (measured). Latency faults are the canary test's job.
        thresholds={"max_latency_ratio": 1.5},
        users=97,
        max_new_tokens=6,
    )
    production = ModelVersionRef(name, "Production")
    [service] = start_services([_launch("production", production, tmp_path, registry_poll_s=0.5)])
    with service:
        registry.stage_candidate(v2, "test")
        good = run_blue_green([service], v1, v2, PROMPTS, spec, "test")
        assert good.decision == "promote", good.reason
        assert good.details["switch_s"] < 5  # the service followed the registry within 5 s
        assert registry.version_in_stage(name, "Production") == v2

        registry.stage_candidate(v3, "test")
        bad = run_blue_green([service], v2, v3, PROMPTS, spec, "test")
        assert bad.decision == "rollback", bad.reason
        failed = {c.name for c in bad.steps[0].checks if c.verdict == "fail"}
        assert failed & {"error_rate", "success_floor"}, bad.reason  # 20 % errors: both tests see them
        assert bad.details["switch_back_s"] < 5
        assert registry.version_in_stage(name, "Production") == v2
        assert registry.describe_version(v3).tags[registry.TAG_DECISION] == "rolled_back"
    moves = [(e.version, e.from_stage, e.to_stage) for e in registry.history(name)]
    assert moves[-4:] == [
        (v3.version, "Staging", "Production"),  # the switch: the new version first ...
        (v2.version, "Production", "Archived"),  # ... then the old one archived
        (v2.version, "Archived", "Production"),  # the switch back: restored first ...
        (v3.version, "Production", "Archived"),
    ]


_cli = run_cli


def test_release_killed_mid_canary_is_recovered(tmp_path: Path, tiny_llm_dir: Path, tracking: str) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    canary = {
        "steps": [{"share": 50, "duration_s": 600}, 100],  # long enough to be killed in
        "max_requests_per_step": 100000,
        "traffic_per_s": 5,
        "max_new_tokens": 3,
        "users": 97,
    }
    spec = tiny_release_spec(tiny_llm_dir, name, "kill-test", canary)
    spec_path = tmp_path / "pipelines.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "lockgate.flows.cli", "run", "tiny", "-f", str(spec_path)],
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            held = release_lock.current(name)
            if held is not None and held.phase.startswith("canary step"):
                break
            time.sleep(1)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        held = release_lock.current(name)
        assert held is not None and held.phase.startswith("canary step"), "never reached the canary"
        # A real service answers behind the release right now; then the release dies without cleanup.
        assert len(held.services) == 2 and all(psutil.pid_exists(pgid) for pgid in held.services)
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()

    # What the killed release left: a dead lock, a Staging candidate, orphaned services.
    stale = release_lock.current(name)
    assert stale is not None and stale.state() == "dead"
    before = {v.version: v.stage for v in registry.list_versions(name)}
    assert before == {"1": "Production", "2": "Staging"}
    status = json.loads(_cli("canary", "status", name, "--json").stdout)
    assert status[name]["release"]["state"] == "dead"
    assert status[name]["staging"] == {"version": "2", "decision": "staged"}

    # Another release is refused only while the owner lives; recovery takes over the dead lock.
    recovered = _cli("canary", "recover", name, "--json")
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    actions = json.loads(recovered.stdout)["actions"]
    assert actions[0].startswith("took over the dead release lock")
    assert sum(a.startswith("stopped orphaned service process group") for a in actions) == 2
    assert actions[-1] == "v2: Staging -> Archived (its canary never reached a decision)"
    assert not any(psutil.pid_exists(pgid) for pgid in stale.services)
    versions = registry.list_versions(name)
    assert [(v.version, v.stage) for v in versions] == [("2", "Archived"), ("1", "Production")]
    assert [v.version for v in versions if v.stage == "Production"] == ["1"]
    assert release_lock.current(name) is None
    again = _cli("canary", "recover", name, "--json")
    assert json.loads(again.stdout)["actions"] == []  # consistent: nothing left to do
