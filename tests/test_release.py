"""End to end: the real default pipeline through the CLI, a gate failure, a faulty canary, rollback.

Slow (the demo model is trained once per session and cached), but run in CI too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from conftest import REPO_ROOT, run_cli
from lockgate.tasks.platform import model_registry as registry

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
        "ECE",
        "p95 ms",
        "latency_p50_ms min_speedup",
        "canary ",
        "monitor ",
        "registry lockgate-demo after the release:",
    ):
        assert needle in out
    # One row per candidate (name, then its version); the registry printed after the decision shows
    # the new champion.
    rows = [line for line in out.splitlines() if re.match(r"(int8|pruned|student)\s+v\d+\s", line)]
    assert len(rows) == 3, out
    assert any("Production" in line and "@champion" in line for line in out.splitlines())
    _check_registry_story_and_rollback()


def _check_registry_story_and_rollback() -> None:
    """What the demo release left in MLflow and Prefect, then `lockgate rollback` and `history` on it."""
    # Registry: the first release put the baseline (v1) in Production; the three candidates became
    # v2-v4; the chosen one replaced the baseline, the others stay registered (rejected or unused).
    stages = _stages("lockgate-demo")
    assert stages["1"] == "Archived" and list(stages.values()).count("Production") == 1
    winner = next(v for v, stage in stages.items() if stage == "Production")
    production = registry.describe_version(registry.ModelVersionRef("lockgate-demo", winner))
    assert production.aliases == (registry.CHAMPION_ALIAS,)
    assert production.tags[registry.TAG_DECISION] == "promoted"
    chosen = production.tags[registry.TAG_CANDIDATE]
    assert chosen in {"int8", "pruned", "student"}
    assert production.tags["lockgate.gates"] == "passed"
    # Registered with its recipe; the registry reads well: descriptions, few tags.
    assert production.tags["lockgate.recipe"] in {"quantize", "prune -> recover", "distill"}
    client = mlflow.MlflowClient()
    assert "champion" in client.get_registered_model("lockgate-demo").description
    for version in client.search_model_versions("name='lockgate-demo'"):
        assert len(version.tags) <= registry.MAX_VERSION_TAGS, version.tags
        assert "### Decisions" in version.description, version.version
    winner_version = client.get_model_version("lockgate-demo", winner)
    assert f"**Candidate `{chosen}`**" in winner_version.description
    assert "**promoted**" in winner_version.description and "latency_p50_ms min_speedup" in (
        winner_version.description
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
    _assert_the_story_is_told(parent, chosen, winner)
    report_dir = Path(os.environ["LOCKGATE_REPORTS_DIR"]) / "demo" / parent.info.run_id
    # The choice is explained: a table with every candidate and a Pareto plot.
    table = (report_dir / "candidates.md").read_text()
    assert all(f"| {c} |" in table for c in ("int8", "pruned", "student")) and "**chosen**" in table
    assert (report_dir / "candidates-pareto.png").stat().st_size > 10_000
    verdict = json.loads((report_dir / "verdict.json").read_text())
    # The release's services do not log text: two length features per group cannot decide alone.
    assert verdict["verdict"] == "insufficient_data"
    assert any("drift.min_columns" in note for note in verdict["notes"])
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
        registry.CHAMPION_ALIAS,
    )
    assert str(client.get_model_version_by_alias("lockgate-demo", "champion").version) == "1"
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
    # "What was in Production then": the promoted winner, at the release's end; v1 now.
    end = parent.info.end_time / 1000
    at = datetime.fromtimestamp(end, UTC).isoformat()
    then = json.loads(_cli("history", "lockgate-demo", "--at", at, "--json").stdout)
    assert then["production"] == winner
    before = json.loads(_cli("history", "lockgate-demo", "--at", "2000-01-01", "--json").stdout)
    assert before["production"] is None
    unknown = _cli("history", "no-such-model")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "no registered model named 'no-such-model'"


def _assert_the_story_is_told(parent: mlflow.entities.Run, chosen: str, winner: str) -> None:
    """The parent run's note, metrics and artifacts; the candidates as LoggedModels; Prefect's artifacts."""
    client = mlflow.MlflowClient()
    note = parent.data.tags["mlflow.note.content"]
    assert "| candidate | version | gates | accuracy |" in note
    assert all(f"| {c} | v" in note for c in ("int8", "pruned", "student"))
    assert f"**{chosen}** (v{winner}): passed every gate" in note
    assert "**Decision: promote**" in note and "## Drift" in note and "## Canary (canary)" in note
    assert parent.data.tags["lockgate.decision"] == "promote"
    assert parent.data.tags["lockgate.winner"] == chosen
    assert {"winner_accuracy", "winner_ece", "winner_latency_p95_ms", "elapsed_s"} <= set(parent.data.metrics)
    assert len(parent.data.params) <= 12  # key parameters; the resolved spec is an artifact
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"candidates.md", "candidates-pareto.png", "spec"} <= artifacts

    # Each candidate is a LoggedModel named after it, from its own compress run, with its metrics and
    # its datasets; the registered version links back to it.
    models = {
        m.name: m
        for m in mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
        if m.name in ("int8", "pruned", "student")
    }
    assert set(models) == {"int8", "pruned", "student"}
    for name, model in models.items():
        run = client.get_run(model.source_run_id)
        assert run.data.tags["lockgate.stage"] == f"compress-{name}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"accuracy", "ece", "latency_p95_ms", "size_bytes"} <= {m.key for m in model.metrics}
        on_eval = [m for m in model.metrics if m.dataset_name == "eval" and m.dataset_digest]
        assert "accuracy" in {m.key for m in on_eval}
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs.get("calibration")  # with its digest
    # The registered version is made from that LoggedModel, and the model lists the version.
    version = client.get_model_version("lockgate-demo", winner)
    assert version.source == f"models:/{models[chosen].model_id}"
    assert version.run_id == models[chosen].source_run_id
    linked = json.loads(client.get_logged_model(models[chosen].model_id).tags["mlflow.modelVersions"])
    assert {"name": "lockgate-demo", "version": int(winner)} in linked or {
        "name": "lockgate-demo",
        "version": winner,
    } in linked

    # Prefect shows the release: tables, the note and a link to the MLflow run on the flow run.
    by_key = _prefect_artifacts(parent.data.tags["prefect.flow_run_id"])
    assert {"demo-candidates", "demo-gates", "demo-canary", "demo-release", "demo-mlflow-run"} <= set(by_key)
    # Prefect 3.9 stores a link artifact as markdown ("[text](url)"): the link is in its data.
    assert by_key["demo-candidates"]["type"] == "table"
    assert by_key["demo-mlflow-run"]["type"] in ("link", "markdown")
    assert parent.info.run_id in str(by_key["demo-mlflow-run"]["data"])


_READ_ARTIFACTS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as prefect:
    found = prefect.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sys.argv[1]]))
    )
print(json.dumps({a.key: {"type": a.type, "data": str(a.data)} for a in found}))
"""


def _prefect_artifacts(flow_run_id: str) -> dict[str, dict[str, str]]:
    """The flow run's artifacts as the CLI's Prefect API holds them. Read in a subprocess with the CLI's
    environment: in this process a session fixture may have pointed Prefect at its test harness."""
    done = subprocess.run(
        [sys.executable, "-c", _READ_ARTIFACTS, flow_run_id],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_candidate_failing_a_gate_is_never_staged(
    tmp_path: Path, tracking: str, prefect_harness: None
) -> None:
    from lockgate.flows.release import release_flow

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
    from lockgate.flows.spec import CanarySpec, PackageSpec
    from lockgate.tasks.canary import canary_task
    from lockgate.tasks.package import build_bento
    from lockgate.tasks.release.serving import start_services
    from lockgate.tasks.release.state import CanaryState

    name = f"faulty-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run(run_name="faulty-canary-test") as run:
        stable = registry.log_model_version(tiny_llm_dir, name, {"lockgate.role": "baseline"})
        registry.promote_first_production(stable, "test baseline")
        broken = registry.log_model_version(_broken_copy(tiny_llm_dir, tmp_path / "broken"), name, {})
        registry.stage_candidate(broken, "test candidate")
        bento = build_bento(PackageSpec(service_name="faulty-test"), {"test": "faulty"}, tmp_path / "pkg")
        prompts = [f"Q: what is {i} plus 3?\nA:" for i in range(20)]
        spec = CanarySpec(steps=(5, 50, 100), min_canary_requests=5, users=100, max_new_tokens=3)
        state = CanaryState.start(
            spec,
            bento_tag=bento.tag,
            stable=stable,
            candidate=broken,
            prompts=prompts,
            request_log=tmp_path / "requests.sqlite",
            log_dir=tmp_path / "logs",
            report_dir=None,
            mlflow_run_id=run.info.run_id,
        )
        result = canary_task(state, spec, "test")
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
        # Served from the bento: the OpenAPI page still names lockgate's version and the model.
        info = httpx.get(f"{service.url}/docs.json", timeout=10).json()["info"]
    assert response.status_code == 200, response.text
    assert info["version"] == importlib.metadata.version("lockgate")
    assert f"**{name}**" in info["description"] and "/v1/chat/completions" in info["description"]
