"""Kubernetes manifests for a pipeline's service: a Deployment and a Service (``lockgate export k8s``).

The pod runs the built bento (``bentoml serve``) following ``models:/NAME@champion``: the alias moves with
every promotion and rollback and running replicas pick it up (hot swap), so no manifest changes on a release.
Rolling updates never drop capacity (maxSurge 1, maxUnavailable 0); readiness is ``/readyz``, which
BentoML answers only once the model is loaded and warmed up, so a cold replica gets no traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.bentos.config import SECRET_VARIABLES, ModelUri, ServiceEnv

if TYPE_CHECKING:
    from lockgate.flows.spec import PipelineSpec

SERVICE_PORT = 3000


def _resources(spec: PipelineSpec) -> dict:
    res = spec.package.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpu:
        # GPUs are extended resources: Kubernetes requires request == limit.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpu)
    return {"requests": requests, "limits": limits}


def secret_name(service_name: str) -> str:
    """The Kubernetes Secret the pod reads its secret variables from (created by the operator)."""
    return f"{service_name}-secrets"


def _secret_refs(service_name: str, service: ServiceEnv) -> list[dict]:
    """Secrets the spec uses (collector headers, Redis URL) are never written into the manifest:
    the pod reads them from a Secret, key = variable name."""
    return [
        {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": secret_name(service_name), "key": variable}},
        }
        for variable in SECRET_VARIABLES
        if variable in service.secret_env()
    ]


def deployment_manifest(
    pipeline: str, spec: PipelineSpec, image: str, replicas: int, mlflow_uri: str, alias: str = "champion"
) -> dict:
    name = spec.package.service_name
    labels = {"app.kubernetes.io/name": name, "lockgate/pipeline": pipeline}
    probe = {"httpGet": {"port": SERVICE_PORT}, "periodSeconds": 5, "timeoutSeconds": 2}
    service = ServiceEnv(
        model_uri=ModelUri.alias(spec.tracking.registered_model, alias),
        config=spec.package.service_config(),
    )
    env = [
        *({"name": key, "value": value} for key, value in service.to_env().items()),
        *_secret_refs(name, service),
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri},
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


def manifests(
    pipeline: str, spec: PipelineSpec, image: str, replicas: int, mlflow_uri: str, alias: str = "champion"
) -> list[dict]:
    return [
        deployment_manifest(pipeline, spec, image, replicas, mlflow_uri, alias),
        service_manifest(pipeline, spec),
    ]


# -- Argo Rollouts: Argo shifts the traffic, lockgate's analysis decides (``export k8s --rollout``) -----
ANALYSIS_INTERVAL_S = 30


def rollout_manifest(
    pipeline: str,
    spec: PipelineSpec,
    image: str,
    replicas: int,
    mlflow_uri: str,
    versions: tuple[str, str],
    analysis_url: str,
) -> dict:
    """An Argo Rollouts ``Rollout``: the Deployment's pod template, the spec's canary steps as
    ``setWeight`` + ``pause`` (a step's ``duration_s``, else one analysis interval), lockgate's
    analysis running in the background from the first step (a ``fail`` aborts the rollout), and an
    indefinite pause before the last step when ``canary.require_approval`` is set (`kubectl argo
    rollouts promote` is the approval). ``versions`` = (stable, canary) registry versions."""
    deployment = deployment_manifest(pipeline, spec, image, replicas, mlflow_uri)
    canary = spec.canary
    steps: list[dict] = []
    for index, step in enumerate(canary.steps):
        last = index == len(canary.steps) - 1
        if last and canary.require_approval:
            steps.append({"pause": {}})
        if step.share < 100:
            steps.append({"setWeight": max(1, round(step.share))})
            steps.append({"pause": {"duration": f"{round(step.duration_s or ANALYSIS_INTERVAL_S)}s"}})
    name = spec.package.service_name
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name, "labels": deployment["metadata"]["labels"]},
        "spec": {
            "replicas": replicas,
            "selector": deployment["spec"]["selector"],
            "template": deployment["spec"]["template"],
            "strategy": {
                "canary": {
                    "maxSurge": 1,
                    "maxUnavailable": 0,
                    "analysis": {
                        "templates": [{"templateName": f"{name}-lockgate"}],
                        "startingStep": 1,
                        "args": [
                            {"name": "model", "value": spec.tracking.registered_model},
                            {"name": "stable-version", "value": versions[0]},
                            {"name": "canary-version", "value": versions[1]},
                            {"name": "analysis-url", "value": analysis_url},
                        ],
                    },
                    "steps": steps,
                }
            },
        },
    }


def analysis_template_manifest(spec: PipelineSpec) -> dict:
    """An ``AnalysisTemplate`` whose ``web`` metric asks lockgate's analysis endpoint
    (tasks/release/analysis_endpoint.py) for the verdict of the version pair: pass / fail /
    inconclusive. Inconclusive (not enough canary traffic yet) is tolerated up to the spec's
    ``live.max_wait_s``; then Argo pauses the rollout for a human, as its inconclusive rule says."""
    canary = spec.canary
    url = (
        "{{args.analysis-url}}/analysis?model={{args.model}}&stable={{args.stable-version}}"
        "&canary={{args.canary-version}}&window_s=" + str(round(canary.live.max_wait_s))
    )
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": {"name": f"{spec.package.service_name}-lockgate"},
        "spec": {
            "args": [{"name": n} for n in ("model", "stable-version", "canary-version", "analysis-url")],
            "metrics": [
                {
                    "name": "lockgate-verdict",
                    "interval": f"{ANALYSIS_INTERVAL_S}s",
                    "successCondition": 'result == "pass"',
                    "failureCondition": 'result == "fail"',
                    "failureLimit": 0,
                    "inconclusiveLimit": max(1, round(canary.live.max_wait_s / ANALYSIS_INTERVAL_S)),
                    "provider": {"web": {"url": url, "jsonPath": "{$.verdict}", "timeoutSeconds": 10}},
                }
            ],
        },
    }
