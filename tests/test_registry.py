"""The registry module against a real MLflow SQLite store: stages, aliases, safe order, rollback."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest

from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.errors import RegistryError


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
    assert registry.describe_version(base).aliases == (registry.CHAMPION_ALIAS,)
    with pytest.raises(RegistryError, match="already has a Production version"):
        registry.promote_first_production(base, "again")


def test_promote_then_rollback_restores_previous(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    assert _stage(cand) == "Staging"
    assert registry.describe_version(cand).aliases == (registry.CHALLENGER_ALIAS,)

    old = registry.promote(cand, "canary passed")
    assert old == base
    assert (_stage(cand), _stage(base)) == ("Production", "Archived")
    info = registry.describe_version(cand)
    assert info.aliases == (registry.CHAMPION_ALIAS,)
    assert info.tags[registry.TAG_PREVIOUS] == base.version
    assert info.tags[registry.TAG_DECISION] == "promoted"
    assert registry.promote(cand, "again") is None  # idempotent

    restored, demoted = registry.roll_back_production(model_name, "bad answers")
    assert (restored, demoted) == (base, cand)
    assert (_stage(base), _stage(cand)) == ("Production", "Archived")
    assert registry.describe_version(base).aliases == (registry.CHAMPION_ALIAS,)
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
    assert listed[1].aliases == (registry.CHAMPION_ALIAS,)


def test_rollback_without_history_is_refused(tiny_llm_dir: Path, model_name: str) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    with pytest.raises(RegistryError, match="no Production version"):
        registry.roll_back_production(model_name, "nothing there")
    registry.promote_first_production(base, "first")
    with pytest.raises(RegistryError, match="records no previous Production version"):
        registry.roll_back_production(model_name, "no history")
    assert _stage(base) == "Production"


def test_registered_version_resolves_and_loads(tiny_llm_dir: Path, model_name: str, tmp_path: Path) -> None:
    from lockgate.bentos.model_resolver import pin_version, resolve_model_dir
    from lockgate.bentos.runtime import load_model

    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    assert pin_version(f"models:/{model_name}/Production").version == base.version
    assert pin_version(f"models:/{model_name}@champion").version == base.version
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


def test_repair_completes_an_interrupted_promotion_and_rolls_back_an_undecided_candidate(
    tiny_llm_dir: Path, model_name: str
) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    assert registry.repair_interrupted(model_name, "nothing to repair") == [
        f"v{cand.version}: Staging -> Archived (its canary never reached a decision)"
    ]
    assert (_stage(base), _stage(cand)) == ("Production", "Archived")
    assert registry.describe_version(cand).tags[registry.TAG_DECISION] == "rolled_back"
    assert registry.repair_interrupted(model_name, "again") == []  # idempotent

    # A crash inside promote(): the new version entered Production, the old one was never archived.
    nxt = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(nxt, "gates passed")
    registry.set_tags(nxt, {registry.TAG_PREVIOUS: base.version})
    registry._transition(nxt, "Production", "canary passed", "test")
    assert {v.version for v in registry.list_versions(model_name) if v.stage == "Production"} == {
        base.version,
        nxt.version,
    }
    actions = registry.repair_interrupted(model_name, "release interrupted", "test")
    assert (
        actions[0] == f"v{base.version}: Production -> Archived (completing the promotion of v{nxt.version})"
    )
    assert f"alias champion -> {nxt.version}" in actions
    assert [(v.version, v.stage) for v in registry.list_versions(model_name)] == [
        (nxt.version, "Production"),
        (cand.version, "Archived"),
        (base.version, "Archived"),
    ]
    assert registry.describe_version(nxt).aliases == (registry.CHAMPION_ALIAS,)


def test_rollback_to_a_named_version(tiny_llm_dir: Path, model_name: str) -> None:
    v1 = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(v1, "first")
    v2 = _register(tiny_llm_dir, model_name, "candidate")
    registry.promote(v2, "second")
    v3 = _register(tiny_llm_dir, model_name, "candidate")
    registry.promote(v3, "third")
    with pytest.raises(RegistryError, match="already in Production"):
        registry.roll_back_production(model_name, "no-op", to_version=v3.version)
    restored, demoted = registry.roll_back_production(model_name, "v2 and v3 both bad", to_version=v1.version)
    assert (restored, demoted) == (v1, v3)
    assert (_stage(v1), _stage(v2), _stage(v3)) == ("Production", "Archived", "Archived")
    assert registry.describe_version(v1).aliases == (registry.CHAMPION_ALIAS,)


def test_repair_switches_back_a_blue_green_release_that_died_while_baking(
    tiny_llm_dir: Path, model_name: str
) -> None:
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    # Died after the switch, during the bake.
    green = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(green, "gates passed")
    registry.mark_decision(green, registry.BAKING, "blue-green switch")
    registry.promote(green, "blue-green switch", decision=registry.BAKING)
    actions = registry.repair_interrupted(model_name, "release interrupted")
    assert (
        actions[0]
        == f"v{green.version}: Production -> Archived, v{base.version} restored (bake never finished)"
    )
    assert (_stage(base), _stage(green)) == ("Production", "Archived")
    # Died inside the switch itself: both in Production, the new one not baked.
    again = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(again, "gates passed")
    registry.mark_decision(again, registry.BAKING, "blue-green switch")
    registry.set_tags(again, {registry.TAG_PREVIOUS: base.version})
    registry._transition(again, "Production", "blue-green switch", "test")
    assert registry.repair_interrupted(model_name, "release interrupted")[0] == (
        f"v{again.version}: Production -> Archived (its blue-green bake never finished)"
    )
    assert [v.version for v in registry.list_versions(model_name) if v.stage == "Production"] == [
        base.version
    ]
    assert registry.describe_version(base).aliases == (registry.CHAMPION_ALIAS,)


def _aliases(name: str) -> dict[str, str]:
    """The registered model's aliases, as MLflow itself reports them."""
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def test_champion_and_challenger_follow_every_transition(tiny_llm_dir: Path, model_name: str) -> None:
    client = mlflow.MlflowClient()
    base = _register(tiny_llm_dir, model_name, "baseline")
    registry.promote_first_production(base, "first")
    assert _aliases(model_name) == {"champion": base.version}
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    assert _aliases(model_name) == {"champion": base.version, "challenger": cand.version}
    registry.roll_back_candidate(cand, "canary failed")
    assert _aliases(model_name) == {"champion": base.version}
    nxt = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(nxt, "gates passed")
    registry.promote(nxt, "canary passed")
    assert _aliases(model_name) == {"champion": nxt.version}
    assert client.get_model_version_by_alias(model_name, "champion").current_stage == "Production"
    registry.roll_back_production(model_name, "bad answers")
    assert _aliases(model_name) == {"champion": base.version}
    # A registry left by an earlier lockgate with the old alias names is migrated by the repair.
    client.set_registered_model_alias(model_name, "production", base.version)
    assert "alias production removed (replaced by champion/challenger)" in registry.repair_interrupted(
        model_name, "upgrade"
    )
    assert _aliases(model_name) == {"champion": base.version}


def test_history_is_one_run_per_model_and_answers_what_was_in_production(
    tiny_llm_dir: Path, model_name: str
) -> None:
    import time

    base = _register(tiny_llm_dir, model_name, "baseline")
    before_first = int(time.time() * 1000) - 1
    registry.promote_first_production(base, "first")
    between = int(time.time() * 1000)
    time.sleep(0.01)
    cand = _register(tiny_llm_dir, model_name, "candidate")
    registry.stage_candidate(cand, "gates passed")
    registry.promote(cand, "canary passed")
    after = int(time.time() * 1000) + 1
    assert registry.production_at(model_name, before_first) is None
    assert registry.production_at(model_name, between) == base.version
    assert registry.production_at(model_name, after) == cand.version
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(registry.HISTORY_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`lockgate.model` = '{model_name}'")
    assert len(runs) == 1 and len(registry.history(model_name)) == 4
    # Its artifacts live with the local store under LOCKGATE_HOME, never in ./mlruns.
    assert experiment.artifact_location == registry_artifact_root()


def registry_artifact_root() -> str:
    from lockgate.tasks.platform.settings import get_settings

    return get_settings().artifact_root


def test_versions_keep_few_tags_and_describe_their_decisions(tiny_llm_dir: Path, model_name: str) -> None:
    with mlflow.start_run(run_name="test-described"):
        base = registry.log_model_version(
            tiny_llm_dir, model_name, {"lockgate.role": "baseline"}, description="The parent, uncompressed."
        )
    registry.promote_first_production(base, "first release: the parent as stable")
    info = mlflow.MlflowClient().get_model_version(model_name, base.version)
    assert info.description.startswith("The parent, uncompressed.")
    assert "**baseline** by `lockgate`: first release: the parent as stable" in info.description
    assert len(info.tags) <= registry.MAX_VERSION_TAGS
    with pytest.raises(RegistryError, match="at most 8"):
        registry.log_model_version(tiny_llm_dir, model_name, {f"k{i}": "v" for i in range(9)})
