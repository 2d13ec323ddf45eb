"""The one module that touches the MLflow model registry.

Stages are what the release is decided by (the user asked for them; MLflow deprecates them but
3.17 keeps them working). Aliases ``production`` and ``canary`` are kept in step with the stages
so alias-based consumers see the same truth. Transitions happen in the safe order: the new version
becomes Production *before* the old one is archived, so there is never a moment with nothing in
Production; the previous Production version is recorded on the new one so a rollback is one step.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import RegistryError
from tasks.log import get_logger

log = get_logger(__name__)

PRODUCTION_ALIAS = "production"
CANARY_ALIAS = "canary"
TAG_DECISION = "lockgate.decision"
TAG_REASON = "lockgate.reason"
TAG_PREVIOUS = "lockgate.previous_production"
TAG_CANDIDATE = "lockgate.candidate"
TAG_TRIGGER = "lockgate.triggered_by"
HISTORY_EXPERIMENT = "lockgate-registry-history"
_PYFUNC_CODE = Path(__file__).resolve().parent.parent / "bentos" / "mlflow_pyfunc.py"
_BENTOS_DIR = _PYFUNC_CODE.parent


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    stage: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    created_ms: int


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


@contextmanager
def _quiet() -> Iterator[None]:
    """Stage APIs warn FutureWarning on every call; the deprecation is known and accepted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def log_model_version(folder: Path, name: str, tags: dict[str, str]) -> ModelVersionRef:
    """Log ``folder`` as a pyfunc model in the active run and register it as a new version."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(_PYFUNC_CODE),
        artifacts={"model": str(folder)},
        code_paths=[str(_BENTOS_DIR)],
        pip_requirements=["torch", "transformers", "torchao", "optimum-quanto", "mlflow"],
    )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    _wait_ready(name, version.version)
    log.info("registered %s version %s", name, version.version)
    return ModelVersionRef(name, str(version.version))


def _wait_ready(name: str, version: str, timeout_s: float = 60) -> None:
    client = _client()
    deadline = time.monotonic() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise RegistryError(f"{name} v{version} did not become READY in {timeout_s:.0f}s")
        time.sleep(0.2)


def get_tags(ref: ModelVersionRef) -> dict[str, str]:
    """The model version's tags."""
    return dict(_client().get_model_version(ref.name, ref.version).tags)


def set_tags(ref: ModelVersionRef, tags: dict[str, str]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, str(value))


def version_in_stage(name: str, stage: str) -> ModelVersionRef | None:
    """The version of ``name`` in ``stage``, if any; RegistryError when no model has that name."""
    from mlflow.exceptions import MlflowException

    try:
        with _quiet():
            versions = _client().get_latest_versions(name, stages=[stage])
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model named {name!r}") from exc
        raise
    if len(versions) > 1:
        raise RegistryError(f"{name}: {len(versions)} versions in {stage}; expected at most one")
    return ModelVersionRef(name, str(versions[0].version)) if versions else None


def _transition(ref: ModelVersionRef, stage: str, reason: str, trigger: str) -> None:
    client = _client()
    before = client.get_model_version(ref.name, ref.version).current_stage
    with _quiet():
        client.transition_model_version_stage(ref.name, ref.version, stage, archive_existing_versions=False)
    _record_event(ref, before, stage, reason, trigger)


@dataclass(frozen=True)
class TransitionEvent:
    """One stage transition, as ``lockgate history`` shows it."""

    time_ms: int
    name: str
    version: str
    from_stage: str
    to_stage: str
    reason: str
    trigger: str


def _record_event(ref: ModelVersionRef, before: str, after: str, reason: str, trigger: str) -> None:
    """Append the transition to the history experiment: MLflow keeps only the current stage, so
    "what was in Production when, and why" would otherwise be lost. One finished run per event."""
    client = _client()
    experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(HISTORY_EXPERIMENT)
    run = client.create_run(
        experiment_id,
        run_name=f"{ref.name} v{ref.version}: {before} -> {after}",
        tags={
            "lockgate.model": ref.name,
            "lockgate.version": ref.version,
            "lockgate.from_stage": before,
            "lockgate.to_stage": after,
            TAG_REASON: reason[:5000],
            TAG_TRIGGER: trigger,
        },
    )
    client.set_terminated(run.info.run_id)


def history(name: str) -> list[TransitionEvent]:
    """Every recorded stage transition of ``name``, oldest first."""
    client = _client()
    experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`lockgate.model` = '{name}'",
        order_by=["attributes.start_time ASC"],
        max_results=50_000,
    )
    return [
        TransitionEvent(
            time_ms=int(r.info.start_time),
            name=name,
            version=r.data.tags["lockgate.version"],
            from_stage=r.data.tags["lockgate.from_stage"],
            to_stage=r.data.tags["lockgate.to_stage"],
            reason=r.data.tags.get(TAG_REASON, ""),
            trigger=r.data.tags.get(TAG_TRIGGER, ""),
        )
        for r in runs
    ]


def _set_alias(name: str, alias: str, version: str | None) -> None:
    client = _client()
    if version is None:
        if alias in client.get_registered_model(name).aliases:
            client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)


def _alias_version(name: str, alias: str) -> str | None:
    version = _client().get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def _decide(ref: ModelVersionRef, decision: str, reason: str, trigger: str) -> None:
    set_tags(ref, {TAG_DECISION: decision, TAG_REASON: reason[:5000], TAG_TRIGGER: trigger})


def promote_first_production(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """The first ever release puts the baseline into Production so something stable exists."""
    if version_in_stage(ref.name, "Production") is not None:
        raise RegistryError(f"{ref.name} already has a Production version")
    _transition(ref, "Production", reason, trigger)
    _set_alias(ref.name, PRODUCTION_ALIAS, ref.version)
    _decide(ref, "baseline", reason, trigger)


def stage_candidate(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """Candidate → Staging (alias ``canary``); any older Staging version is archived first."""
    previous = version_in_stage(ref.name, "Staging")
    if previous is not None and previous.version != ref.version:
        superseded = f"replaced in Staging by v{ref.version}"
        _transition(previous, "Archived", superseded, trigger)
        _decide(previous, "superseded", superseded, trigger)
    _transition(ref, "Staging", reason, trigger)
    _set_alias(ref.name, CANARY_ALIAS, ref.version)
    _decide(ref, "staged", reason, trigger)


def reject_candidate(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """A candidate that failed a gate: tagged ``rejected``, never staged."""
    _decide(ref, "rejected", reason, trigger)


def promote(
    ref: ModelVersionRef, reason: str, trigger: str = "lockgate", decision: str = "promoted"
) -> ModelVersionRef | None:
    """Candidate → Production, then the old Production → Archived. Returns the old version.

    ``decision`` is the tag the new version ends with (blue-green switches with ``baking``)."""
    old = version_in_stage(ref.name, "Production")
    if old is not None and old.version == ref.version:
        return None  # idempotent: already promoted
    if old is not None:
        set_tags(ref, {TAG_PREVIOUS: old.version})
    _transition(ref, "Production", reason, trigger)
    _set_alias(ref.name, PRODUCTION_ALIAS, ref.version)
    if _alias_version(ref.name, CANARY_ALIAS) == ref.version:
        _set_alias(ref.name, CANARY_ALIAS, None)
    if old is not None:
        replaced = f"replaced in Production by v{ref.version}"
        _transition(old, "Archived", replaced, trigger)
        _decide(old, "replaced", replaced, trigger)
    _decide(ref, decision, reason, trigger)
    log.info(
        "promoted %s v%s to Production (previous: %s)", ref.name, ref.version, old.version if old else "-"
    )
    return old


def roll_back_candidate(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """Canary failed: candidate → Archived; Production is untouched."""
    _transition(ref, "Archived", reason, trigger)
    if _alias_version(ref.name, CANARY_ALIAS) == ref.version:
        _set_alias(ref.name, CANARY_ALIAS, None)
    _decide(ref, "rolled_back", reason, trigger)
    log.warning("rolled back candidate %s v%s: %s", ref.name, ref.version, reason)


def roll_back_production(
    name: str, reason: str, trigger: str = "lockgate", to_version: str | None = None
) -> tuple[ModelVersionRef, ModelVersionRef]:
    """Production goes back to the version it replaced (or to ``to_version``). Returns (restored, demoted)."""
    current = version_in_stage(name, "Production")
    if current is None:
        raise RegistryError(f"{name} has no Production version to roll back")
    previous = to_version or describe_version(current).tags.get(TAG_PREVIOUS)
    if not previous:
        raise RegistryError(f"{name} v{current.version} records no previous Production version")
    if previous == current.version:
        raise RegistryError(f"{name} v{previous} is already in Production")
    restored = ModelVersionRef(name, previous)
    describe_version(restored)  # raises for a version that does not exist, before anything moves
    restore_reason = f"restored by rollback of v{current.version}: {reason}"
    _transition(restored, "Production", restore_reason, trigger)  # restore first: never empty
    _set_alias(name, PRODUCTION_ALIAS, restored.version)
    _transition(current, "Archived", reason, trigger)
    _decide(current, "rolled_back", reason, trigger)
    _decide(restored, "restored", restore_reason, trigger)
    log.warning("rolled back %s Production v%s -> v%s: %s", name, current.version, previous, reason)
    return restored, current


BAKING = "baking"  # blue-green: in Production, post-switch checks not finished


def mark_decision(ref: ModelVersionRef, decision: str, reason: str, trigger: str = "lockgate") -> None:
    """Record a decision on a version (``lockgate.decision`` / ``reason`` / ``triggered_by`` tags)."""
    _decide(ref, decision, reason, trigger)


def mark_canary_passed(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """The analysis passed but the spec says ``promote: false``: the candidate stays in Staging, tagged
    ``canary_passed``, for `lockgate promote` (recovery leaves such a candidate alone)."""
    _decide(ref, "canary_passed", reason, trigger)


def repair_interrupted(name: str, reason: str, trigger: str = "lockgate") -> list[str]:
    """Bring the registry of ``name`` back to a consistent state after a release died mid-way.

    Call only while holding the model's release lock (no live release can be mid-transition):

    * two Production versions (a crash inside :func:`promote`, after the new version entered
      Production and before the old one was archived): a canary promotion was decided, so it is
      completed — the version whose ``lockgate.previous_production`` names another Production version
      stays; a blue-green switch (new version tagged ``baking``) was not, so the old version stays;
    * a Production version still ``baking`` (blue-green died during its bake): switched back;
    * a Staging version still tagged ``staged`` or ``baking`` (its canary never reached a decision):
      rolled back to Archived — it never got a verdict, so it must not linger half-released;
    * aliases are set to match the stages.

    Returns what was done, one line per action (empty when the registry was consistent)."""
    actions: list[str] = []
    versions = list_versions(name)
    production = [v for v in versions if v.stage == "Production"]
    if len(production) > 1:
        numbers = {v.version for v in production}
        newer = [v for v in production if v.tags.get(TAG_PREVIOUS) in numbers]
        if len(newer) != 1:
            raise RegistryError(
                f"{name}: {len(production)} Production versions ({', '.join(sorted(numbers))}) and no single "
                "interrupted promotion explains them; resolve with `lockgate rollback --to VERSION`"
            )
        switched = newer[0].tags.get(TAG_DECISION) == BAKING
        keep = ModelVersionRef(name, newer[0].tags[TAG_PREVIOUS] if switched else newer[0].version)
        for other in production:
            if other.version != keep.version:
                old = ModelVersionRef(name, other.version)
                if switched:  # the unbaked new version goes; the one it replaced stays
                    _transition(old, "Archived", f"blue-green bake interrupted: {reason}", trigger)
                    _decide(old, "rolled_back", f"blue-green bake interrupted: {reason}", trigger)
                    actions.append(
                        f"v{other.version}: Production -> Archived (its blue-green bake never finished)"
                    )
                    continue
                replaced = f"replaced in Production by v{keep.version} (interrupted promotion completed)"
                _transition(old, "Archived", replaced, trigger)
                _decide(old, "replaced", replaced, trigger)
                actions.append(
                    f"v{other.version}: Production -> Archived (completing the promotion of v{keep.version})"
                )
        if not switched:
            _decide(keep, "promoted", f"interrupted promotion completed: {reason}", trigger)
        production = [v for v in production if v.version == keep.version]
    elif len(production) == 1 and production[0].tags.get(TAG_DECISION) == BAKING:
        baked = production[0]
        restored, _ = roll_back_production(name, f"blue-green bake interrupted: {reason}", trigger)
        actions.append(
            f"v{baked.version}: Production -> Archived, v{restored.version} restored (bake never finished)"
        )
        production = [v for v in list_versions(name) if v.stage == "Production"]
    for v in versions:
        if v.stage == "Staging" and v.tags.get(TAG_DECISION) in ("staged", BAKING):
            roll_back_candidate(ModelVersionRef(name, v.version), reason, trigger)
            actions.append(f"v{v.version}: Staging -> Archived (its canary never reached a decision)")
    prod_version = production[0].version if production else None
    if _alias_version(name, PRODUCTION_ALIAS) != prod_version:
        _set_alias(name, PRODUCTION_ALIAS, prod_version)
        actions.append(f"alias {PRODUCTION_ALIAS} -> {prod_version or '(removed)'}")
    staged = version_in_stage(name, "Staging")
    canary_alias = _alias_version(name, CANARY_ALIAS)
    if canary_alias is not None and (staged is None or staged.version != canary_alias):
        _set_alias(name, CANARY_ALIAS, staged.version if staged else None)
        actions.append(f"alias {CANARY_ALIAS} -> {staged.version if staged else '(removed)'}")
    for action in actions:
        log.warning("%s repair: %s", name, action)
    return actions


def describe_version(ref: ModelVersionRef) -> VersionInfo:
    mv = _client().get_model_version(ref.name, ref.version)
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        stage=mv.current_stage,
        aliases=tuple(mv.aliases),
        tags=dict(mv.tags),
        run_id=mv.run_id,
        created_ms=int(mv.creation_timestamp),
    )


def list_versions(name: str) -> list[VersionInfo]:
    """All versions of ``name`` (newest first) with stage, aliases and tags."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        raise RegistryError(f"no registered model named {name!r}") from exc
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name='{name}'")
    infos = [
        VersionInfo(
            name=mv.name,
            version=str(mv.version),
            stage=mv.current_stage,
            # search results carry no aliases (MLflow 3.17): take them from the registered model.
            aliases=tuple(sorted(by_version.get(str(mv.version), []))),
            tags=dict(mv.tags),
            run_id=mv.run_id,
            created_ms=int(mv.creation_timestamp),
        )
        for mv in versions
    ]
    return sorted(infos, key=lambda v: int(v.version), reverse=True)


def registered_model_names() -> list[str]:
    return sorted(m.name for m in _client().search_registered_models())
