"""`lockgate export k8s` writes manifests the Kubernetes client's models accept, with safe rollouts."""

from __future__ import annotations

import subprocess
import sys

import yaml
from kubernetes import client
from kubernetes.client import ApiClient

from conftest import REPO_ROOT


class _Response:
    def __init__(self, data: str) -> None:
        self.data = data


def _as(doc: dict, kind: str) -> object:
    """Deserialize with the Kubernetes client (unknown fields and wrong types raise)."""
    import json

    return ApiClient().deserialize(_Response(json.dumps(doc)), kind)


def test_manifests_parse_and_roll_out_safely() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lockgate.flows.cli",
            "export",
            "k8s",
            "demo",
            "--image",
            "reg/lockgate-demo:1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    deployment_doc, service_doc = list(yaml.safe_load_all(done.stdout))
    deployment = _as(deployment_doc, "V1Deployment")
    service = _as(service_doc, "V1Service")
    assert isinstance(deployment, client.V1Deployment) and isinstance(service, client.V1Service)
    rolling = deployment.spec.strategy.rolling_update
    assert (rolling.max_surge, rolling.max_unavailable) == (1, 0)
    container = deployment.spec.template.spec.containers[0]
    assert container.image == "reg/lockgate-demo:1"
    assert (
        container.resources.limits["nvidia.com/gpu"] == "1" == container.resources.requests["nvidia.com/gpu"]
    )
    assert container.liveness_probe.http_get.path == "/healthz"
    assert container.readiness_probe.http_get.path == "/readyz"
    env = {e.name: e.value for e in container.env}
    assert env["LOCKGATE_MODEL_URI"] == "models:/lockgate-demo@champion"
    assert service.spec.selector == deployment.spec.selector.match_labels
    assert service.spec.ports[0].target_port == container.ports[0].container_port
