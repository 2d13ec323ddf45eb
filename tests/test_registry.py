"""The registry module against a real MLflow SQLite store: stages, aliases, safe order, rollback."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest

from tasks import registry
from tasks.errors import RegistryError


def _register(folder: Path, name: str, role: str) -> registry.ModelVersionRef:
    with mlflow.start_run(run_name=f"test-{role}"):
        return registry.log_model_version(folder, name, {"lockgate.role": role})


@pytest.fixture
def model_name(tracking: str) -> str:
    return f"reg-{uuid.uuid4().hex[:8]}"


def _stage(ref: registry.ModelVersionRef) -> str:
    return registry.describe_version(ref).stage


def test_first_release_promotes_baseline_and_sets_alias(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    assert _stage(base) == "Production"
    assert registry.describe_version(base).aliases == (registry.PRODUCTION_ALIAS,)
    with pytest.raises(RegistryError, match="already has a Production version"):
        registry.promote_first_production(base, "again")


def test_promote_then_rollback_restores_previous(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    assert _stage(cand) == "Staging"
    assert registry.describe_version(cand).aliases == (registry.CANARY_ALIAS,)

    old = registry.promote(cand, "canary passed")
    assert old == base
    assert (_stage(cand), _stage(base)) == ("Production", "Archived")
    info = registry.describe_version(cand)
    assert info.aliases == (registry.PRODUCTION_ALIAS,)
    assert info.tags[registry.TAG_PREVIOUS] == base.version
    assert info.tags[registry.TAG_DECISION] == "promoted"
    assert registry.promote(cand, "again") is None  # idempotent

    restored, demoted = registry.roll_back_production(model_name, "bad answers")
    assert (restored, demoted) == (base, cand)
    assert (_stage(base), _stage(cand)) == ("Production", "Archived")
    assert registry.describe_version(base).aliases == (registry.PRODUCTION_ALIAS,)
    assert registry.describe_version(cand).tags[registry.TAG_DECISION] == "rolled_back"
    assert registry.version_in_stage(model_name, "Production") == base

    moves = [(e.version, e.from_stage, e.to_stage) for e in registry.history(model_name)]
    assert moves == [
        (base.version, "None", "Production"),
        (cand.version, "None", "Staging"),
        (cand.version, "Staging", "Production"),
        (base.version, "Production", "Archived"),
        (base.version, "Archived", "Production"),
        (cand.version, "Production", "Archived"),
    ]
    assert registry.history(model_name)[-1].reason == "bad answers"


def test_candidate_rollback_leaves_production_untouched(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    registry.roll_back_candidate(cand, "errors in canary")
    assert (_stage(base), _stage(cand)) == ("Production", "Archived")
    assert registry.describe_version(cand).aliases == ()
    listed = registry.list_versions(model_name)
    assert [(v.version, v.stage) for v in listed] == [
        (cand.version, "Archived"),
        (base.version, "Production"),
    ]
    assert listed[1].aliases == (registry.PRODUCTION_ALIAS,)


def test_rollback_without_history_is_refused(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    with pytest.raises(RegistryError, match="no Production version"):
        registry.roll_back_production(model_name, "nothing there")
    registry.promote_first_production(base, "first")
    with pytest.raises(RegistryError, match="records no previous Production version"):
        registry.roll_back_production(model_name, "no history")
    assert _stage(base) == "Production"


def test_registered_version_resolves_and_loads(tiny_llm_dir: Path, model_name: str, tmp_path: Path) -> None:
    from bentos.model_resolver import pin_version, resolve_model_dir
    from bentos.runtime import load_model

    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    assert pin_version(f"models:/{model_name}/Production").version == base.version
    assert pin_version(f"models:/{model_name}@production").version == base.version
    folder = resolve_model_dir(f"models:/{model_name}/Production", tmp_path)
    generated = load_model(folder).generate(["Q: what is 1 plus 2?\nA:"], max_new_tokens=3)
    assert generated[0].output_tokens >= 1
    # The same version is served from the cache the second time.
    assert resolve_model_dir(f"models:/{model_name}/{base.version}", tmp_path) == folder


def test_pyfunc_flavour_predicts(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    model = mlflow.pyfunc.load_model(base.uri)
    out = model.predict(["Q: what is 3 plus 4?\nA:"], params={"max_new_tokens": 2})
    assert len(out) == 1 and isinstance(out[0], str)
