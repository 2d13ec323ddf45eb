"""Which engine serves a version (``package.engine``) and which python starts a service: decided in one
place each (bentos/model_host.py ``choose_engine``, tasks/release/serving.py ``serving_python``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lockgate.bentos.config import ModelUri, ServiceConfig
from lockgate.bentos.model_host import choose_engine
from lockgate.tasks.release import serving

VLLM_HERE = importlib.util.find_spec("vllm") is not None


def test_engine_defaults_to_auto_and_rejects_unknown_names() -> None:
    assert ServiceConfig().engine == "auto"
    with pytest.raises(ValueError, match="engine"):
        ServiceConfig.model_validate({"engine": "tensorrt"})


@pytest.mark.skipif(VLLM_HERE, reason="checks the control plane's environment, which has no vLLM")
def test_auto_without_vllm_serves_with_transformers_and_says_why(tiny_llm_dir: Path) -> None:
    choice = choose_engine("auto", tiny_llm_dir)
    assert choice.kind == "transformers"
    assert "vLLM is not installed in this environment" in choice.reason and "make serve-env" in choice.reason
    assert choice.as_dict() == {"asked": "auto", "engine": "transformers", "reason": choice.reason}


@pytest.mark.skipif(VLLM_HERE, reason="checks the control plane's environment, which has no vLLM")
def test_vllm_asked_where_it_cannot_serve_fails_naming_the_field(tiny_llm_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"package\.engine: vllm cannot serve this version: vLLM is not"):
        choose_engine("vllm", tiny_llm_dir)


def test_transformers_asked_is_transformers(tiny_llm_dir: Path) -> None:
    assert choose_engine("transformers", tiny_llm_dir).kind == "transformers"


@pytest.fixture
def serve_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    venv = tmp_path / ".venv-serve"
    monkeypatch.setattr(serving, "SERVE_VENV", venv)
    return venv


def _python_in(venv: Path) -> Path:
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text("#!/bin/sh\n")
    (venv / serving.SERVE_STAMP).touch()  # what `make serve-env` writes last
    return python


def test_serving_python_takes_the_serving_environment_when_vllm_may_run(serve_venv: Path) -> None:
    folder = ModelUri.folder(Path("/models/m"))
    auto, vllm = ServiceConfig(), ServiceConfig.model_validate({"engine": "vllm"})
    # No serving environment yet: this python, and the log says what to build.
    missing = serving.serving_python(auto, folder, "sqlite:///x.db")
    assert missing.executable == sys.executable and "make serve-env" in missing.reason
    # Half-built (an install in progress): its python exists but it is not picked.
    (serve_venv / "bin").mkdir(parents=True)
    (serve_venv / "bin" / "python").write_text("#!/bin/sh\n")
    unfinished = serving.serving_python(auto, folder, "sqlite:///x.db")
    assert unfinished.executable == sys.executable and "unfinished" in unfinished.reason
    python = _python_in(serve_venv)
    for config in (auto, vllm):
        chosen = serving.serving_python(config, folder, "sqlite:///x.db")
        assert chosen.executable == str(python) and "serving environment has vLLM" in chosen.reason
    http_registry = serving.serving_python(
        auto, ModelUri.parse("models:/m@champion"), "http://127.0.0.1:5000"
    )
    assert http_registry.executable == str(python)


def test_serving_python_for_transformers_and_sqlite_registries(serve_venv: Path) -> None:
    python = _python_in(serve_venv)
    transformers = ServiceConfig.model_validate({"engine": "transformers"})
    chosen = serving.serving_python(transformers, ModelUri.folder(Path("/m")), "sqlite:///x.db")
    assert chosen.executable == sys.executable and chosen.reason == "package.engine: transformers"
    registry = ModelUri.parse("models:/m/3")
    # auto keeps the laptop set-up (a SQLite registry) on this python, and says how to ask for vLLM.
    auto = serving.serving_python(ServiceConfig(), registry, "sqlite:////tmp/x.db")
    assert auto.executable == sys.executable and "package.engine: vllm serves it" in auto.reason
    # Asked explicitly, vLLM serves it: the serving environment reads a SQLite registry itself
    # (tests/vllm_engine/test_vllm_registry.py reads one there).
    vllm = ServiceConfig.model_validate({"engine": "vllm"})
    assert serving.serving_python(vllm, registry, "sqlite:////tmp/x.db").executable == str(python)


def test_release_summary_names_each_services_engine_and_why() -> None:
    from lockgate.flows.release import ReleaseSummary
    from lockgate.flows.summary import render_summary
    from lockgate.tasks.release.outcome import CanaryResult

    reason = "transformers (package.engine: auto; vLLM cannot serve it: m: int8-quantized weights ...)"
    summary = ReleaseSummary("demo", "demo-llm", "promoted", "run", "http://mlflow/run", "flow", 1.0)
    summary.canary = CanaryResult(
        (), "promote", "all steps passed", details={"engine_stable": "vllm (...)", "engine_canary": reason}
    )
    text = render_summary(summary)
    assert f"engine     canary: {reason}" in text and "engine     stable: vllm (...)" in text


def test_keyless_release_services_bind_loopback_on_a_public_host(
    tmp_path: Path, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOCKGATE_HOST=0.0.0.0 (a team machine): the release's keyless services stay unreachable from
    other machines; with an API key file they bind the address asked for."""
    from lockgate.tasks.platform.settings import get_settings

    monkeypatch.setenv("LOCKGATE_HOST", "0.0.0.0")
    get_settings.cache_clear()
    monkeypatch.setattr(serving, "SERVE_VENV", tmp_path / "no-serve-env")
    try:
        launch = {"target": "lockgate.bentos.llm_service:LLMService", "model_uri": str(tiny_llm_dir)}
        keyless = serving.launch_service(
            role="stable", request_log=tmp_path / "a.sqlite", log_dir=tmp_path, **launch
        )
        keyless.stop()
        keys = tmp_path / "keys.json"
        keys.write_text("{}")
        keyed = serving.launch_service(
            role="canary", request_log=tmp_path / "b.sqlite", log_dir=tmp_path, api_keys_file=keys, **launch
        )
        keyed.stop()
    finally:
        get_settings.cache_clear()
    assert keyless.url.startswith("http://127.0.0.1:") and "127.0.0.1" in keyless.process.args
    assert keyed.url.startswith("http://0.0.0.0:") and "0.0.0.0" in keyed.process.args


def test_router_starts_its_services_with_the_python_lockgate_serve_chose(tmp_path: Path) -> None:
    from lockgate.bentos.router_settings import RouterSettings

    default = RouterSettings(model="m", live_log_dir=tmp_path)
    assert default.service_python == sys.executable
    chosen = RouterSettings(model="m", live_log_dir=tmp_path, service_python="/srv/.venv-serve/bin/python")
    assert RouterSettings.from_env(chosen.to_env()) == chosen


def test_vllm_thread_binding_gives_a_small_host_every_core() -> None:
    """vLLM's CPU build keeps one core from the model's threads; on 2 cores that halved the compute
    (SmolLM2 at 16 clients: 1.5x the tokens/s with none reserved)."""
    from lockgate.bentos.vllm_engine import cpu_thread_env

    assert cpu_thread_env(None, 2, environ={}) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_env(None, 1, environ={}) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_env(None, 16, environ={}) == {}  # vLLM's own default on bigger hosts
    assert cpu_thread_env(2, 16, environ={}) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}
    # An operator's variable wins over the spec and the default.
    assert cpu_thread_env(1, 2, environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) == {}
    with pytest.raises(ValueError, match=r"vllm\.cpu_reserved_cores: 2 leaves none of this host's 2 cores"):
        cpu_thread_env(2, 2, environ={})


def test_vllm_knobs_are_spec_fields_checked_by_name() -> None:
    assert ServiceConfig().vllm.enforce_eager is True and ServiceConfig().vllm.cpu_reserved_cores is None
    with pytest.raises(ValueError, match=r"vllm\.cpu_reserved_cores"):
        ServiceConfig.model_validate({"vllm": {"cpu_reserved_cores": -1}})
    with pytest.raises(ValueError, match=r"vllm\.max_threads"):
        ServiceConfig.model_validate({"vllm": {"max_threads": 4}})
