"""The serving environment reads a local SQLite registry itself (mlflow-skinny + SQLAlchemy), so a
service asked to run on vLLM can follow ``models:/NAME@champion`` in the laptop set-up too.

Runs in .venv-serve (make test-vllm): the registry is written with MLflow there, as the control plane
writes it, and read back through the service's own resolver."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import IN_SERVING_ENV, build_tiny_model
from lockgate.bentos.model_resolver import pin_version, resolve_model_dir

pytestmark = [pytest.mark.vllm, IN_SERVING_ENV]


def test_the_serving_environment_follows_a_sqlite_registry_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = build_tiny_model(tmp_path / "tiny", heads=2, kv_heads=1)
    client = MlflowClient()
    experiment = client.create_experiment("serve-env", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model), "model")
    client.create_registered_model("tiny")
    for _ in range(2):  # two versions: the alias, not "the latest", decides
        version = client.create_model_version("tiny", f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias("tiny", "champion", "1")
    assert str(version.version) == "2"

    pinned = pin_version("models:/tiny@champion")
    assert (pinned.name, pinned.version) == ("tiny", "1")
    folder = resolve_model_dir("models:/tiny@champion", tmp_path / "cache")
    assert (folder / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert mlflow.get_tracking_uri() == uri
