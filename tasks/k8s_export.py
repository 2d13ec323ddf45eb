"""Kubernetes manifests for a pipeline's service: a Deployment and a Service (``lockgate export k8s``).

The pod runs the built bento (``bentoml serve``) following ``models:/NAME/Production``: a registry
stage transition is picked up by running replicas (hot swap), so no manifest changes on a release.
Rolling updates never drop capacity (maxSurge 1, maxUnavailable 0); readiness is ``/readyz``, which
BentoML answers only once the model is loaded and warmed up, so a cold replica gets no traffic.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tasks.package import service_config

if TYPE_CHECKING:
    from flows.spec import PipelineSpec

SERVICE_PORT = 3000


def _resources(spec: PipelineSpec) -> dict:
    res = spec.package.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpu:
        # GPUs are extended resources: Kubernetes requires request == limit.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpu)
    return {"requests": requests, "limits": limits}


def deployment_manifest(
    pipeline: str, spec: PipelineSpec, image: str, replicas: int, mlflow_uri: str
) -> dict:
    name = spec.package.service_name
    labels = {"app.kubernetes.io/name": name, "lockgate/pipeline": pipeline}
    probe = {"httpGet": {"port": SERVICE_PORT}, "periodSeconds": 5, "timeoutSeconds": 2}
    env = [
        {"name": "LOCKGATE_MODEL_URI", "value": f"models:/{spec.tracking.registered_model}/Production"},
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri},
        {"name": "LOCKGATE_SERVICE_CONFIG", "value": json.dumps(service_config(spec.package))},
        {"name": "LOCKGATE_SERVICE_ROLE", "value": "stable"},
        {"name": "BENTOML_DO_NOT_TRACK", "value": "true"},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": spec.package.limits.timeout_s + 10,
                    "containers": [
                        {
                            "name": "llm",
                            "image": image,
                            "args": ["serve", "--port", str(SERVICE_PORT)],
                            "ports": [{"name": "http", "containerPort": SERVICE_PORT}],
                            "env": env,
                            "resources": _resources(spec),
                            "livenessProbe": {
                                **probe,
                                "httpGet": {**probe["httpGet"], "path": "/healthz"},
                                "failureThreshold": 3,
                            },
                            # Loading + warm-up can take minutes for large models: readiness gates traffic.
                            "readinessProbe": {
                                **probe,
                                "httpGet": {**probe["httpGet"], "path": "/readyz"},
                                "failureThreshold": 1,
                            },
                            "startupProbe": {
                                **probe,
                                "httpGet": {**probe["httpGet"], "path": "/healthz"},
                                "failureThreshold": 60,
                            },
                        }
                    ],
                },
            },
        },
    }


def service_manifest(pipeline: str, spec: PipelineSpec) -> dict:
    name = spec.package.service_name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": name, "lockgate/pipeline": pipeline}},
        "spec": {
            "selector": {"app.kubernetes.io/name": name, "lockgate/pipeline": pipeline},
            "ports": [{"name": "http", "port": 80, "targetPort": SERVICE_PORT}],
        },
    }


def manifests(pipeline: str, spec: PipelineSpec, image: str, replicas: int, mlflow_uri: str) -> list[dict]:
    return [
        deployment_manifest(pipeline, spec, image, replicas, mlflow_uri),
        service_manifest(pipeline, spec),
    ]
