"""`lockgate export k8s --rollout` writes an Argo Rollouts Rollout + AnalysisTemplate that validate
against the CRD schemas Argo Rollouts publishes (manifests/crds/*.yaml), under strict field validation
(an unknown field is an error, as `kubectl apply --validate=strict` makes it).

The two CRD files are Argo Rollouts' own (Apache-2.0), data from the public repository kept out of
this repository's commits: they live in the steering checkout's shared folder
(``shared/data/argo-rollouts/``, with SOURCE.md naming the commit they came from). Tests cannot
download; without that folder the test is skipped and says where to put them.
"""

from __future__ import annotations

import copy
import gzip
import subprocess
import sys
from pathlib import Path

import yaml
from jsonschema import Draft7Validator

from conftest import REPO_ROOT

#: Argo Rollouts' published CRDs, gzipped (tests/data/argo-rollouts/SOURCE.md says which commit).
CRD_DIR = REPO_ROOT / "tests" / "data" / "argo-rollouts"


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected wherever the schema lists its properties."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _validator(crd_file: str) -> Draft7Validator:
    crd = yaml.safe_load(gzip.decompress((CRD_DIR / f"{crd_file}.gz").read_bytes()))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator: Draft7Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _spec_file(tmp_path: Path) -> Path:
    """The repository's pipelines.yaml with a live canary that asks for approval."""
    spec = yaml.safe_load((REPO_ROOT / "pipelines.yaml").read_text())
    pipeline = next(iter(spec["pipelines"].values()))
    pipeline.setdefault("canary", {})
    pipeline["canary"].update(
        {"steps": [5, {"share": 25, "duration_s": 120}, 50, 100], "require_approval": True, "traffic": "live"}
    )
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_exported_rollout_and_analysis_template_validate_against_argo_crds(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "lockgate.flows.cli",
                "export",
                "k8s",
                "--file",
                str(_spec_file(tmp_path)),
            ),
            *("--rollout", "--stable-version", "3", "--canary-version", "4", "--image", "reg/llm:1"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout)}
    assert set(docs) == {"Rollout", "Service", "AnalysisTemplate"}
    rollout, template = docs["Rollout"], docs["AnalysisTemplate"]
    assert _errors(_validator("rollout-crd.yaml"), rollout) == []
    assert _errors(_validator("analysis-template-crd.yaml"), template) == []

    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert steps == [
        {"setWeight": 5},
        {"pause": {"duration": "30s"}},
        {"setWeight": 25},
        {"pause": {"duration": "120s"}},
        {"setWeight": 50},
        {"pause": {"duration": "30s"}},
        {"pause": {}},  # require_approval: `kubectl argo rollouts promote` is the approval
    ]
    analysis = rollout["spec"]["strategy"]["canary"]["analysis"]
    assert analysis["templates"] == [{"templateName": template["metadata"]["name"]}]
    args = {a["name"]: a["value"] for a in analysis["args"]}
    assert args["stable-version"] == "3" and args["canary-version"] == "4"
    [metric] = template["spec"]["metrics"]
    assert metric["provider"]["web"]["jsonPath"] == "{$.verdict}"
    assert "/analysis?model={{args.model}}" in metric["provider"]["web"]["url"]

    # the strict validation is not vacuous: a misspelt field and a wrong type are caught
    broken = copy.deepcopy(rollout)
    broken["spec"]["strategy"]["canary"]["steps"][0] = {"setWeigth": 5}
    assert _errors(_validator("rollout-crd.yaml"), broken)
    broken = copy.deepcopy(template)
    broken["spec"]["metrics"][0]["provider"]["web"]["timeoutSeconds"] = "ten"
    assert _errors(_validator("analysis-template-crd.yaml"), broken)
