"""End to end: the real default pipeline through the CLI, a gate failure, a faulty canary, rollback.

Slow (the demo model is trained once per session and cached), but run in CI too.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from conftest import REPO_ROOT, run_cli

from tasks import registry

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=1800)  # a whole release runs in it


def _spec_copy(tmp_path: Path, **changes: object) -> tuple[Path, str]:
    """The repo's pipelines.yaml with a fresh registered model name and the given top-level changes."""
    text = yaml.safe_load((REPO_ROOT / "pipelines.yaml").read_text())
    pipeline = text["pipelines"]["demo"]
    name = f"t-{uuid.uuid4().hex[:8]}"
    pipeline["tracking"]["registered_model"] = name
    for dotted, value in changes.items():
        node = pipeline
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path, name


def _stages(name: str) -> dict[str, str]:
    return {v.version: v.stage for v in registry.list_versions(name)}


def test_default_pipeline_end_to_end_then_cli_rollback(tracking: str) -> None:
    done = _cli("run", "demo", "-f", "pipelines.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = done.stdout
    assert "release demo -> PROMOTED" in out
    for needle in (
        "perplexity",
        "accuracy",
        "latency_p95_ms",
        "size_bytes",
        "latency_p50_ms.min_speedup",
        "canary ",
        "monitor ",
    ):
        assert needle in out

    # Registry: the first release put the baseline (v1) in Production; the three candidates became
    # v2-v4; the chosen one replaced the baseline, the others stay registered (rejected or unused).
    stages = _stages("lockgate-demo")
    assert stages["1"] == "Archived" and list(stages.values()).count("Production") == 1
    winner = next(v for v, stage in stages.items() if stage == "Production")
    production = registry.describe_version(registry.ModelVersionRef("lockgate-demo", winner))
    assert production.aliases == (registry.PRODUCTION_ALIAS,)
    assert production.tags[registry.TAG_DECISION] == "promoted"
    chosen = production.tags[registry.TAG_CANDIDATE]
    assert chosen in {"int8", "pruned", "student"}
    assert production.tags["lockgate.gates"] == "passed"
    # Registered with its recipe, and faster than the parent as the gate demands.
    assert production.tags["lockgate.recipe"] in {"quantize", "prune -> recover", "distill"}
    assert float(production.tags["lockgate.eval.latency_p50_ms"]) < float(
        production.tags["lockgate.baseline.latency_p50_ms"]
    )

    # MLflow: one parent run with nested stage runs, the Prefect flow-run id, and the reports.
    runs = mlflow.search_runs(experiment_names=["lockgate-demo"], output_format="list")
    parent = next(r for r in runs if r.data.tags.get("lockgate.pipeline") == "demo")
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["lockgate.outcome"] == "promoted"
    children = {
        r.data.tags.get("lockgate.stage")
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert {
        "validate-data",
        "prepare-parent",
        *(f"{stage}-{c}" for stage in ("compress", "evaluate") for c in ("int8", "pruned", "student")),
        "register",
        "package",
        "canary",
        "monitor",
    } <= children
    report_dir = Path(os.environ["LOCKGATE_REPORTS_DIR"]) / "demo" / parent.info.run_id
    # The choice is explained: a table with every candidate and a Pareto plot.
    table = (report_dir / "candidates.md").read_text()
    assert all(f"| {c} |" in table for c in ("int8", "pruned", "student")) and "**chosen**" in table
    assert (report_dir / "candidates-pareto.png").stat().st_size > 10_000
    verdict = json.loads((report_dir / "verdict.json").read_text())
    assert verdict["verdict"] in {"drift", "no_drift"}
    assert (report_dir / "drift-prompts.html").stat().st_size > 10_000

    # `lockgate status` and `lockgate rollback` work on what the run left.
    status = json.loads(_cli("status", "lockgate-demo", "--json").stdout)
    assert {v["version"]: v["stage"] for v in status["lockgate-demo"]}[winner] == "Production"
    rolled = _cli("rollback", "lockgate-demo", "--reason", "test rollback", "--json")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"model": "lockgate-demo", "production": "1", "archived": winner}
    assert _stages("lockgate-demo")["1"] == "Production"
    assert _stages("lockgate-demo")[winner] == "Archived"
    assert registry.describe_version(registry.ModelVersionRef("lockgate-demo", "1")).aliases == (
        "production",
    )
    history = _cli("history", "lockgate-demo")
    assert history.returncode == 0, history.stderr
    moves = [line.split()[1:5] for line in history.stdout.splitlines()]
    w = f"v{winner}"
    expected = [
        ["v1", "None", "->", "Production"],
        [w, "None", "->", "Staging"],
        [w, "Staging", "->", "Production"],
        ["v1", "Production", "->", "Archived"],
        ["v1", "Archived", "->", "Production"],
        [w, "Production", "->", "Archived"],
    ]
    # Other candidates' transitions (rejected: None -> Archived) are history too, in between.
    assert [m for m in moves if m[0] in ("v1", w)] == expected


def test_candidate_failing_a_gate_is_never_staged(
    tmp_path: Path, tracking: str, prefect_harness: None
) -> None:
    from flows.release import release_flow

    # No INT8 model is 5 % of its parent's size: the size gate must fail. (One cheap candidate.)
    spec_path, name = _spec_copy(
        tmp_path,
        compress__candidates=[{"name": "int8", "steps": [{"quantize": {"mode": "dynamic"}}]}],
        evaluate__gates={"size_bytes": {"max_ratio": 0.05}},
    )
    summary = release_flow(str(spec_path), "demo")
    assert summary.outcome == "rejected"
    assert summary.canary is None and summary.bento_tag is None
    assert _stages(name) == {"1": "Production", "2": "None"}
    candidate = registry.describe_version(registry.ModelVersionRef(name, "2"))
    assert candidate.tags[registry.TAG_DECISION] == "rejected"
    assert "size_bytes max_ratio 0.05" in candidate.tags[registry.TAG_REASON]
    assert candidate.aliases == ()


def _broken_copy(source: Path, target: Path) -> Path:
    """A model whose embedding table is too small for its tokenizer: most prompts raise in forward()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(8)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def test_faulty_candidate_is_rolled_back_and_production_keeps_serving(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str, prefect_harness: None
) -> None:
    from flows.spec import CanarySpec, PackageSpec
    from tasks.canary import canary_task
    from tasks.package import build_bento
    from tasks.serving import start_services

    name = f"faulty-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="faulty-canary-test") as run:
        stable = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        registry.promote_first_production(stable, "test baseline")
        broken = registry.log_model_version(_broken_copy(tiny_llm_dir, tmp_path / "broken"), name, {})
        registry.stage_candidate(broken, "test candidate")
        bento = build_bento(PackageSpec(service_name="faulty-test"), {"test": "faulty"}, tmp_path / "pkg")
        prompts = [f"Q: what is {i} plus 3?\nA:" for i in range(20)]
        spec = CanarySpec(steps=(5, 50, 100), min_canary_requests=5, users=100, max_new_tokens=3)
        result = canary_task(
            bento.tag,
            stable,
            broken,
            prompts,
            spec,
            tmp_path / "requests.sqlite",
            tmp_path / "logs",
            run.info.run_id,
            "test",
        )
    assert result.decision == "rollback"
    # The broken model fails the service's warm-up, or (without warm-up) every request.
    assert "candidate service failed to start" in result.reason or "success rate 0.000" in result.reason
    assert _stages(name) == {"1": "Production", "2": "Archived"}
    assert registry.describe_version(broken).tags[registry.TAG_DECISION] == "rolled_back"

    # Production is what a fresh replica serves, and it answers.
    [service] = start_services(
        [
            {
                "target": bento.tag,
                "role": "stable",
                "model_uri": f"models:/{name}/Production",
                "request_log": tmp_path / "after.sqlite",
                "log_dir": tmp_path / "logs",
            }
        ]
    )
    with service:
        response = httpx.post(
            f"{service.url}/generate", json={"prompt": prompts[0], "max_new_tokens": 3}, timeout=60
        )
    assert response.status_code == 200, response.text
