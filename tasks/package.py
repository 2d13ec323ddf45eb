"""Stage 5: package the service as a Bento (``bentoml build``), resolving the model from the registry.

The bento holds ``bentos/`` only; the model version is resolved at start-up from
``LOCKGATE_MODEL_URI`` (a ``models:/`` URI), so one bento serves stable and canary alike and a
registry transition is all it takes to change what a fresh replica serves. Resources (GPU
included) and limits come from the spec and are baked into the bento at build time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from tasks.errors import StageFailed
from tasks.log import get_logger
from tasks.settings import export_environment
from tasks.tracking import stage_run

if TYPE_CHECKING:
    from flows.spec import PackageSpec

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_IMPORT = "bentos.llm_service:LLMService"
BENTO_PYTHON_PACKAGES = [
    "torch",
    "transformers",
    "tokenizers",
    "torchao",
    "optimum-quanto",
    "mlflow",
    "pandas<3",
    "prometheus-client",
    "redis",
]


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    path: Path


def service_config(spec: PackageSpec) -> dict[str, object]:
    """The JSON the service reads from ``LOCKGATE_SERVICE_CONFIG`` (see bentos/llm_service.py)."""
    return {
        "gpu": spec.resources.gpu,
        "cpu": spec.resources.cpu,
        "memory": spec.resources.memory,
        "max_batch_size": spec.batching.max_batch_size,
        "max_latency_ms": spec.batching.max_latency_ms,
        "engine": spec.batching.engine,
        "max_step_tokens": spec.batching.max_step_tokens,
        "max_prompt_chars": spec.limits.max_prompt_chars,
        "max_new_tokens": spec.limits.max_new_tokens,
        "timeout_s": spec.limits.timeout_s,
        "concurrency": spec.limits.concurrency,
        "max_batch_items": spec.limits.max_batch_items,
        "kv_cache_budget_mb": spec.capacity.kv_cache_budget_mb,
        "max_queue": spec.capacity.max_queue,
        "warmup_requests": spec.warmup_requests,
        "price_per_1k_prompt_tokens": spec.pricing.prompt_per_1k_tokens,
        "price_per_1k_completion_tokens": spec.pricing.completion_per_1k_tokens,
        "response_cache": spec.response_cache.model_dump(),
        "tracing": spec.tracing.model_dump(),
    }


def _bentofile(spec: PackageSpec, labels: dict[str, str], folder: Path) -> Path:
    path = folder / "bentofile.yaml"
    content = {
        "service": SERVICE_IMPORT,
        "name": spec.service_name,
        "labels": labels,
        "include": ["bentos/*.py"],
        "python": {"packages": BENTO_PYTHON_PACKAGES, "lock_packages": False},
        "envs": [{"name": "LOCKGATE_SERVICE_CONFIG", "value": json.dumps(service_config(spec))}],
    }
    path.write_text(json.dumps(content, indent=2))  # JSON is valid YAML
    return path


def build_bento(spec: PackageSpec, labels: dict[str, str], work_dir: Path) -> BuiltBento:
    """``bentoml build`` in a child process, so the service module is imported with this config."""
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **export_environment(), "LOCKGATE_SERVICE_CONFIG": json.dumps(service_config(spec))}
    bentofile = _bentofile(spec, labels, work_dir)
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "build",
        str(REPO_ROOT),
        "-f",
        str(bentofile),
        "--output",
        "tag",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise StageFailed("package", f"bentoml build failed ({done.returncode}): {done.stderr[-2000:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    store = Path(env["BENTOML_HOME"]) / "bentos" / tag.replace(":", "/")
    log.info("built bento %s", tag)
    return BuiltBento(tag=tag, path=store)


@task(name="package", retries=1, retry_delay_seconds=2)
def package_task(
    spec: PackageSpec, labels: dict[str, str], work_dir: Path, parent_run_id: str | None
) -> BuiltBento:
    """Build the bento in a nested MLflow run; retried once (pure I/O)."""
    import mlflow

    with stage_run(parent_run_id, "package"):
        bento = build_bento(spec, labels, work_dir)
        mlflow.log_params({"bento_tag": bento.tag, "gpu": spec.resources.gpu, "service": spec.service_name})
        bento_yaml = bento.path / "bento.yaml"
        if bento_yaml.is_file():
            mlflow.log_artifact(str(bento_yaml), "bento")
    return bento
