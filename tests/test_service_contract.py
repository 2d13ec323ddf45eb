"""The serving contract (bentos/config.py): one config class for the spec and the service, one place
that spells the service's variables, one model-URI parser, secrets that never leave in clear."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from lockgate.bentos.config import (
    SECRET_VARIABLES,
    ModelUri,
    ModelUriError,
    ServiceConfig,
    ServiceEnv,
)
from lockgate.flows.spec import PackageSpec
from lockgate.flows.spec_loader import load_spec_text, resolved_spec
from lockgate.tasks.platform.errors import SpecError

CONTRACT = "bentos/config.py"
SERVICE_NAMES = re.compile(
    r'"LOCKGATE_(MODEL_|SERVICE_|REQUEST_LOG|REGISTRY_POLL|API_KEYS_FILE|FEATURE_FLAGS_FILE|LOG_TEXT)'
)
REDIS_URL = "redis://:hunter2-redis@cache:6379/0"
COLLECTOR_TOKEN = "Bearer hunter2-collector"


def test_service_variables_are_spelled_only_in_the_contract() -> None:
    spelled = {
        str(path.relative_to(REPO_ROOT))
        for folder in ("bentos", "tasks", "flows", "bench")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if SERVICE_NAMES.search(path.read_text())
    }
    assert spelled == {CONTRACT}


def test_service_modules_import_without_cycles() -> None:
    """The service on its own (the tasks/ cycles are tracked by test_architecture): in particular the
    WebSocket module imports downward, never the service module."""
    from test_architecture import _graph

    graph = {
        name: {target for target in targets if target.startswith("lockgate.bentos")}
        for name, targets in _graph().items()
        if name.startswith("lockgate.bentos")
    }
    assert "lockgate.bentos.llm_service" not in graph["lockgate.bentos.websocket"]

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        for target in graph[node]:
            if target == start or (target not in seen and reaches(start, target, seen | {target})):
                return True
        return False

    cyclic = {name for name in graph if reaches(name, name, {name})}
    assert cyclic == set()


def test_package_spec_is_the_service_config_plus_its_name() -> None:
    assert issubclass(PackageSpec, ServiceConfig)
    assert set(PackageSpec.model_fields) == set(ServiceConfig.model_fields) | {"service_name"}
    spec_schema = PackageSpec.model_json_schema()
    service_schema = ServiceConfig.model_json_schema()
    del spec_schema["properties"]["service_name"]
    assert spec_schema["properties"] == service_schema["properties"]
    assert spec_schema["$defs"] == service_schema["$defs"]


# Values at, inside and beyond every bound that once differed between the spec and the service.
PACKAGE_VALUES = [
    {},
    {"batching": {"max_batch_size": 256}},
    {"batching": {"max_batch_size": 257}},
    {"batching": {"max_batch_size": 512}},  # the issue's bug: validated, then refused by the service
    {"batching": {"max_latency_ms": 0}},
    {"batching": {"max_latency_ms": 60_000}},
    {"batching": {"max_latency_ms": 60_001}},
    {"batching": {"engine": "static", "max_step_tokens": 16}},
    {"batching": {"engine": "paged"}},
    {"limits": {"max_prompt_chars": 1_000_000, "max_new_tokens": 32_768}},
    {"limits": {"max_new_tokens": 32_769}},
    {"limits": {"timeout_s": 0}},
    {"limits": {"concurrency": 10_001}},
    {"capacity": {"kv_cache_budget_mb": 0}},
    {"capacity": {"kv_cache_budget_mb": 12.5, "max_queue": 0}},
    {"resources": {"gpu": 1, "cpu": 2, "memory": "4Gi"}},
    {"resources": {"cpu": "two"}},
    {"warmup_requests": 101},
    {"pricing": {"prompt_per_1k_tokens": 0.5, "completion_per_1k_tokens": 1000}},
    {"pricing": {"prompt_per_1k_tokens": -1}},
    {"response_cache": {"enabled": True, "backend": "redis"}},
    {"response_cache": {"enabled": True, "backend": "redis", "redis_url": REDIS_URL}},
    {"response_cache": {"redis_url": "http://not-redis"}},
    {"tracing": {"exporter": "otlp", "headers": {"Authorization": COLLECTOR_TOKEN}}},
    {"tracing": {"endpoint": "udp://collector"}},
    {"gpu": 1},  # the old flat service key
]


def _validate_accepts(package: dict) -> bool:
    """What ``lockgate validate`` says about a spec with this ``package:`` section."""
    text = textwrap.dedent(
        """\
        version: 1
        pipelines:
          demo:
            compress:
              candidates:
                - name: int8
                  steps:
                    - quantize: {bits: 8}
            tracking:
              registered_model: demo-llm
        """
    )
    spec = yaml.safe_load(text)
    spec["pipelines"]["demo"]["package"] = package
    try:
        load_spec_text(yaml.safe_dump(spec), "p.yaml")
    except SpecError:
        return False
    return True


def _service_accepts(package: dict) -> bool:
    """What the service says about the same values, as its environment carries them."""
    secrets = {}
    if "redis_url" in package.get("response_cache", {}):
        secrets["LOCKGATE_SERVICE_REDIS_URL"] = package["response_cache"]["redis_url"]
    if "headers" in package.get("tracing", {}):
        secrets["LOCKGATE_SERVICE_TRACING_HEADERS"] = json.dumps(package["tracing"]["headers"])
    public = json.loads(json.dumps(package))
    public.get("response_cache", {}).pop("redis_url", None)
    public.get("tracing", {}).pop("headers", None)
    try:
        ServiceEnv.from_env({"LOCKGATE_SERVICE_CONFIG": json.dumps(public), **secrets})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("package", PACKAGE_VALUES, ids=lambda p: json.dumps(p, sort_keys=True))
def test_validate_and_the_service_accept_the_same_package_values(package: dict) -> None:
    assert _validate_accepts(package) == _service_accepts(package)


def test_the_issue_batch_size_is_refused_by_validate() -> None:
    assert not _validate_accepts({"batching": {"max_batch_size": 512}})


def test_protocol_and_config_import_no_bentoml_and_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lockgate.bentos.protocol, lockgate.bentos.config"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "lockgate.bentos.protocol" in imported
    heavy = {name for name in imported if name.split(".")[0] in ("bentoml", "torch", "transformers")}
    assert heavy == set()


SECRET_CONFIG = ServiceConfig.model_validate(
    {
        "response_cache": {"enabled": True, "backend": "redis", "redis_url": REDIS_URL},
        "tracing": {"exporter": "otlp", "headers": {"Authorization": COLLECTOR_TOKEN}},
    }
)


@pytest.mark.parametrize(
    "env",
    [
        ServiceEnv(),
        ServiceEnv(model_uri=ModelUri.folder("/models/qa-int8"), role="canary", log_text=True),
        ServiceEnv(
            model_uri=ModelUri.parse("models:/demo/7"),
            model_name="demo",
            model_version="7",
            request_log=Path("/tmp/requests.sqlite"),
            api_keys_file=Path("/etc/keys.json"),
            feature_flags_file=Path("/etc/flags.json"),
            model_cache=Path("/var/cache/models"),
        ),
        ServiceEnv(model_uri=ModelUri.stage("demo", "Production"), registry_poll_s=0.3),
        ServiceEnv(model_uri=ModelUri.alias("demo", "champion"), config=SECRET_CONFIG),
        ServiceEnv(
            config=ServiceConfig.model_validate(
                {"batching": {"engine": "static", "max_batch_size": 256}, "limits": {"max_new_tokens": 4}}
            )
        ),
    ],
)
def test_service_env_round_trips(env: ServiceEnv) -> None:
    assert ServiceEnv.from_env({**env.to_env(), **env.secret_env()}) == env


@pytest.mark.parametrize(
    ("text", "kind", "name", "ref"),
    [
        ("models:/demo/7", "version", "demo", "7"),
        ("models:/demo@champion", "alias", "demo", "champion"),
        ("models:/demo/Production", "stage", "demo", "Production"),
        ("models:/demo/staging", "stage", "demo", "staging"),
        ("/srv/models/qa-int8/", "folder", "qa-int8", "/srv/models/qa-int8/"),
    ],
)
def test_model_uri_parses_every_form(text: str, kind: str, name: str, ref: str) -> None:
    uri = ModelUri.parse(text)
    assert (uri.kind, uri.name, uri.ref) == (kind, name, ref)
    assert str(uri) == text and ModelUri.parse(str(uri)) == uri
    assert uri.floats == (kind in ("alias", "stage"))


@pytest.mark.parametrize("text", ["models:/demo/Tuesday", "models:/", "models:/a/b/c", ""])
def test_model_uri_refuses_malformed(text: str) -> None:
    with pytest.raises(ModelUriError):
        ModelUri.parse(text)


def _secret_spec() -> PackageSpec:
    return PackageSpec.model_validate(SECRET_CONFIG.model_dump(mode="python"))


def test_secrets_stay_out_of_what_is_logged_baked_or_exported(tmp_path: Path) -> None:
    from lockgate.flows.release import key_params
    from lockgate.tasks.package import _bentofile
    from lockgate.tasks.platform.k8s_export import deployment_manifest

    spec = _secret_spec()
    service = ServiceEnv(config=spec.service_config())
    assert set(service.secret_env()) == set(SECRET_VARIABLES)  # they exist, in their own variables
    clear = ("hunter2",)

    def leaks(text: str) -> bool:
        return any(secret in text for secret in clear)

    pipeline = load_spec_text(
        yaml.safe_dump(
            {
                "version": 1,
                "pipelines": {
                    "demo": {
                        "compress": {"candidates": [{"name": "int8", "steps": [{"quantize": {"bits": 8}}]}]},
                        "tracking": {"registered_model": "demo-llm"},
                        "package": SECRET_CONFIG.model_dump(mode="python")
                        | {
                            "response_cache": {"enabled": True, "backend": "redis", "redis_url": REDIS_URL},
                            "tracing": {"exporter": "otlp", "headers": {"Authorization": COLLECTOR_TOKEN}},
                        },
                    }
                },
            }
        ),
        "p.yaml",
    ).pipelines["demo"]
    assert pipeline.package.response_cache.redis_url is not None  # the spec holds it
    resolved = resolved_spec(pipeline)
    assert not leaks(json.dumps(resolved))  # spec/resolved.json
    assert not leaks(json.dumps(key_params(pipeline)))  # MLflow params
    assert not leaks(json.dumps(service.to_env()))  # baked into a bento / a manifest
    bentofile = _bentofile(spec, {}, tmp_path)
    assert not leaks(bentofile.read_text())
    manifest = deployment_manifest("demo", pipeline, "reg/img:1", 1, "http://mlflow:5000")
    assert not leaks(json.dumps(manifest))
    env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    from_secret = {e["name"] for e in env if "valueFrom" in e}
    assert from_secret == set(SECRET_VARIABLES)  # the pod reads them from a Kubernetes Secret
    assert not leaks(repr(spec)) and not leaks(str(spec.tracing))
