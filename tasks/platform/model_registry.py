"""The one module that touches the MLflow model registry.

Stages are what the release is decided by (the user asked for them; MLflow deprecates them but
3.17 keeps them working). Aliases move with every stage transition under MLflow's conventional
names: ``champion`` is the Production version, ``challenger`` the candidate in Staging. MLflow 3's UI,
``models:/NAME@champion`` URIs and MLflow webhooks (which fire on alias changes, never on stage
transitions) therefore see every promotion and rollback. Transitions happen in the safe order: the new version
becomes Production *before* the old one is archived, so there is never a moment with nothing in
Production; the previous Production version is recorded on the new one so a rollback is one step.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lockgate.bentos.config import ModelUri
from lockgate.bentos.rollout import (  # one definition: routers read the same aliases
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
)
from lockgate.tasks.platform.code_bundle import BENTOS_SOURCE, stage_service_code
from lockgate.tasks.platform.errors import RegistryError
from lockgate.tasks.platform.log import get_logger

log = get_logger(__name__)

#: Aliases earlier lockgate versions set; :func:`repair_interrupted` removes them.
LEGACY_ALIASES = ("production", "canary")
#: A version's tags stay few (the MLflow UI shows them all); the rest lives in its description
#: and in the linked runs.
MAX_VERSION_TAGS = 8
TAG_DECISION = "lockgate.decision"
TAG_REASON = "lockgate.reason"
TAG_PREVIOUS = "lockgate.previous_production"
TAG_CANDIDATE = "lockgate.candidate"
TAG_TRIGGER = "lockgate.triggered_by"
TAG_ACTION = "lockgate.action"
HISTORY_EXPERIMENT = "lockgate-registry-history"
HISTORY_EVENTS_DIR = "events"
_PYFUNC_CODE = BENTOS_SOURCE / "mlflow_pyfunc.py"


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return str(ModelUri.version(self.name, self.version))


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


def log_model_version(
    folder: Path, name: str, tags: dict[str, str], description: str | None = None, model_name: str = "model"
) -> ModelVersionRef:
    """Log ``folder`` as a pyfunc model in the active run and register it as a new version."""
    _check_tag_count(name, tags)
    info = log_pyfunc_model(folder, model_name)
    return register_logged_model(info.model_id, name, tags, description)


def log_pyfunc_model(folder: Path, model_name: str, **kwargs: object):
    """Log ``folder`` as an MLflow 3 LoggedModel named ``model_name`` (the pyfunc wrapper runs the
    service's own runtime) in the active run; returns MLflow's ModelInfo (``model_id``, ``model_uri``)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="lockgate-code-") as staging:
        return mlflow.pyfunc.log_model(
            name=model_name,
            python_model=str(_PYFUNC_CODE),
            artifacts={"model": str(folder)},
            code_paths=[str(stage_service_code(Path(staging)))],
            pip_requirements=["torch", "transformers", "torchao", "optimum-quanto", "mlflow"],
            **kwargs,
        )


def register_logged_model(
    model_id: str, name: str, tags: dict[str, str], description: str | None = None
) -> ModelVersionRef:
    """Register the LoggedModel ``model_id`` as a new version of ``name``. MLflow links the two: the
    version's source is ``models:/<model_id>`` and its run the one that logged the model; the model
    gets the ``mlflow.modelVersions`` tag the Models tab shows."""
    import mlflow

    _check_tag_count(name, tags)
    with _quiet_mlflow_prints():
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    _wait_ready(name, str(version.version))
    if description:
        _client().update_model_version(name, str(version.version), description=description)
    log.info("registered %s version %s (logged model %s)", name, version.version, model_id)
    return ModelVersionRef(name, str(version.version))


@contextmanager
def _quiet_mlflow_prints() -> Iterator[None]:
    """``register_model`` prints "Created version ..." (and "Successfully registered model") to stderr
    on every call; lockgate logs the registration itself."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    before = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = before


def _check_tag_count(name: str, tags: dict[str, str], current: dict[str, str] | None = None) -> None:
    """The one check of every path that tags a version (registration and :func:`set_tags`): the
    version's tags after the change, ``current`` merged with ``tags``, are at most ``MAX_VERSION_TAGS``."""
    after = {**(current or {}), **tags}
    if len(after) > MAX_VERSION_TAGS:
        added = sorted(set(tags) - set(current or {}))
        raise RegistryError(
            f"{name}: {len(after)} tags on a version (adding {', '.join(added)}); at most "
            f"{MAX_VERSION_TAGS}: the rest belongs in its description or its run"
        )


def describe_model(name: str, description: str) -> None:
    """The registered model's description (what it is, how lockgate releases it)."""
    _client().update_registered_model(name, description=description)


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
    """Set (add or overwrite) tags of a version; RegistryError, and nothing set, when the version would
    end with more than ``MAX_VERSION_TAGS``."""
    client = _client()
    current = dict(client.get_model_version(ref.name, ref.version).tags)
    _check_tag_count(f"{ref.name} v{ref.version}", tags, current)
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
    action: str = ""  # an operator or rollout action that moved no stage (canary pause, share, ...)


def _history_experiment_id() -> str:
    """The history experiment; its artifacts live under LOCKGATE_HOME with the local store (a
    tracking server picks its own), never in ``./mlruns``."""
    from lockgate.tasks.platform.settings import get_settings

    client = _client()
    experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    settings = get_settings()
    local = client.tracking_uri.startswith("sqlite:")
    return client.create_experiment(
        HISTORY_EXPERIMENT, artifact_location=settings.artifact_root if local else None
    )


def _history_run_id(name: str, create: bool) -> str | None:
    """The one run that holds ``name``'s deployment history (created on its first event)."""
    client = _client()
    experiment_id = _history_experiment_id()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`lockgate.model` = '{name}' and tags.`lockgate.history` = 'events'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    if not create:
        return None
    run = client.create_run(
        experiment_id,
        run_name=f"{name} deployment history",
        tags={
            "lockgate.model": name,
            "lockgate.history": "events",
            "mlflow.note.content": f"Every stage transition of registered model `{name}`, one JSON file "
            f"per event under `{HISTORY_EVENTS_DIR}/`; `lockgate history {name}` reads them. The metric "
            "`production_version` charts which version was in Production over time.",
        },
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _record_event(
    ref: ModelVersionRef, before: str, after: str, reason: str, trigger: str, action: str = ""
) -> None:
    """Append the transition to the model's history run: MLflow keeps only the current stage, so
    "what was in Production when, and why" would otherwise be lost. One JSON artifact per event in one
    run per model (not one run per event), plus a ``production_version`` metric for the chart."""
    import json
    import uuid

    client = _client()
    run_id = _history_run_id(ref.name, create=True)
    now_ns = time.time_ns()
    now_ms = now_ns // 1_000_000
    event = {
        "time_ms": now_ms,
        "name": ref.name,
        "version": ref.version,
        "from_stage": before,
        "to_stage": after,
        "reason": reason,
        "trigger": trigger,
        **({"action": action} if action else {}),
    }
    # Names sort by time (ns); a random suffix keeps writers on different hosts from colliding.
    client.log_text(
        run_id, json.dumps(event), f"{HISTORY_EVENTS_DIR}/{now_ns:020d}-{uuid.uuid4().hex[:8]}.json"
    )
    if after == "Production":
        client.log_metric(run_id, "production_version", float(ref.version), timestamp=now_ms)


def history(name: str) -> list[TransitionEvent]:
    """Every recorded stage transition of ``name``, oldest first (also events that earlier lockgate
    versions recorded as one run each)."""
    import json

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
    events = [
        TransitionEvent(
            time_ms=int(r.info.start_time),
            name=name,
            version=r.data.tags["lockgate.version"],
            from_stage=r.data.tags["lockgate.from_stage"],
            to_stage=r.data.tags["lockgate.to_stage"],
            reason=r.data.tags.get(TAG_REASON, ""),
            trigger=r.data.tags.get(TAG_TRIGGER, ""),
            action=r.data.tags.get(TAG_ACTION, ""),
        )
        for r in runs
        if "lockgate.from_stage" in r.data.tags  # one run per event (before the history run)
    ]
    run_id = next((r.info.run_id for r in runs if r.data.tags.get("lockgate.history") == "events"), None)
    if run_id is not None and client.list_artifacts(run_id, HISTORY_EVENTS_DIR):
        import mlflow

        with tempfile.TemporaryDirectory(prefix="lockgate-history-") as tmp:
            folder = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=HISTORY_EVENTS_DIR, dst_path=tmp
                )
            )
            events += [TransitionEvent(**json.loads(f.read_text())) for f in sorted(folder.glob("*.json"))]
    return sorted(events, key=lambda e: e.time_ms)  # stable: events of one millisecond keep file order


def production_at(name: str, time_ms: int) -> str | None:
    """The version that was in Production at ``time_ms`` according to the recorded history."""
    production: set[str] = set()
    for event in history(name):
        if event.time_ms > time_ms:
            break
        if event.to_stage == "Production":
            production.add(event.version)
        elif event.from_stage == "Production":
            production.discard(event.version)
    if len(production) > 1:  # inside a promotion: the new one is already Production
        return max(production, key=int)
    return next(iter(production), None)


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
    """Record a decision: three short tags (what, why in brief, who) and a line appended to the
    version's description, which keeps every decision in full."""
    from datetime import UTC, datetime

    set_tags(ref, {TAG_DECISION: decision, TAG_REASON: _brief(reason), TAG_TRIGGER: trigger})
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    append_to_description(ref, DECISIONS_HEADER, f"- {when} **{decision}** by `{trigger}`: {reason}")


DECISIONS_HEADER = "### Decisions"


def append_to_description(ref: ModelVersionRef, header: str, line: str) -> None:
    """Append ``line`` under the ``header`` section of the version's description (the section is
    added at the end the first time): what does not fit in its few tags is kept here, in full."""
    client = _client()
    description = client.get_model_version(ref.name, ref.version).description or ""
    updated = with_section_line(description, header, line)
    client.update_model_version(ref.name, ref.version, description=updated)


def with_section_line(markdown: str, header: str, line: str) -> str:
    """``markdown`` with ``line`` at the end of the ``header`` section (before the next heading), the
    section added at the end when missing."""
    lines = markdown.rstrip().splitlines()
    if header not in lines:
        lines += ["", header] if lines else [header]
    end = lines.index(header) + 1
    while end < len(lines) and not lines[end].startswith("#"):
        end += 1
    while lines[end - 1] == "":
        end -= 1
    return "\n".join([*lines[:end], line, *lines[end:]]) + "\n"


def _brief(reason: str, limit: int = 250) -> str:
    """A reason short enough for a tag column; the description keeps it whole."""
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def promote_first_production(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """The first ever release puts the baseline into Production so something stable exists."""
    if version_in_stage(ref.name, "Production") is not None:
        raise RegistryError(f"{ref.name} already has a Production version")
    _transition(ref, "Production", reason, trigger)
    _set_alias(ref.name, CHAMPION_ALIAS, ref.version)
    _decide(ref, "baseline", reason, trigger)


def stage_candidate(ref: ModelVersionRef, reason: str, trigger: str = "lockgate") -> None:
    """Candidate → Staging (alias ``canary``); any older Staging version is archived first."""
    previous = version_in_stage(ref.name, "Staging")
    if previous is not None and previous.version != ref.version:
        superseded = f"replaced in Staging by v{ref.version}"
        _transition(previous, "Archived", superseded, trigger)
        _decide(previous, "superseded", superseded, trigger)
    _transition(ref, "Staging", reason, trigger)
    _set_alias(ref.name, CHALLENGER_ALIAS, ref.version)
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
    _set_alias(ref.name, CHAMPION_ALIAS, ref.version)
    if _alias_version(ref.name, CHALLENGER_ALIAS) == ref.version:
        _set_alias(ref.name, CHALLENGER_ALIAS, None)
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
    if _alias_version(ref.name, CHALLENGER_ALIAS) == ref.version:
        _set_alias(ref.name, CHALLENGER_ALIAS, None)
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
    _set_alias(name, CHAMPION_ALIAS, restored.version)
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
                "interrupted promotion explains them; resolve with `lockgate rollback --version N`"
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
    if _alias_version(name, CHAMPION_ALIAS) != prod_version:
        _set_alias(name, CHAMPION_ALIAS, prod_version)
        actions.append(f"alias {CHAMPION_ALIAS} -> {prod_version or '(removed)'}")
    staged = version_in_stage(name, "Staging")
    canary_alias = _alias_version(name, CHALLENGER_ALIAS)
    if canary_alias is not None and (staged is None or staged.version != canary_alias):
        _set_alias(name, CHALLENGER_ALIAS, staged.version if staged else None)
        actions.append(f"alias {CHALLENGER_ALIAS} -> {staged.version if staged else '(removed)'}")
    for legacy in LEGACY_ALIASES:  # set by earlier lockgate versions; champion/challenger replace them
        if _alias_version(name, legacy) is not None:
            _set_alias(name, legacy, None)
            actions.append(f"alias {legacy} removed (replaced by {CHAMPION_ALIAS}/{CHALLENGER_ALIAS})")
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


# -- live rollout: the share of live traffic routers send to a candidate (tag names: bentos/rollout.py) --
def set_rollout(name: str, tags: dict[str, str]) -> None:
    """Set rollout tags (``lockgate.rollout.*``) on the registered model; every router replica follows
    them within its poll interval. Only rollout tags are accepted."""
    from lockgate.bentos.rollout import ROLLOUT_TAGS, TAG_STATE

    unknown = sorted(set(tags) - set(ROLLOUT_TAGS))
    if unknown:
        raise RegistryError(f"not rollout tags: {', '.join(unknown)}")
    client = _client()
    # MLflow sets one tag per call. The state goes last: readers act on a state change (a worker that
    # sees "aborting" reads the abort reason next), so everything it implies must already be there.
    for key, value in sorted(tags.items(), key=lambda item: item[0] == TAG_STATE):
        client.set_registered_model_tag(name, key, str(value))


def read_rollout(name: str):  # -> lockgate.bentos.rollout.Rollout
    """The routing the registry holds for ``name`` now (what every router replica computes)."""
    from lockgate.bentos.rollout import rollout_from_registry

    model = _registered(name)
    return rollout_from_registry(name, dict(model.tags), dict(model.aliases))


def rollout_tags(name: str) -> dict[str, str]:
    """The raw ``lockgate.rollout.*`` tags of ``name`` (state, share, step, approver, ...)."""
    from lockgate.bentos.rollout import TAG_PREFIX

    return {k: v for k, v in _registered(name).tags.items() if k.startswith(TAG_PREFIX)}


def clear_rollout(name: str, keep: tuple[str, ...] = ()) -> None:
    """Remove the rollout tags (routers send everything to Production on their next poll)."""
    from lockgate.bentos.rollout import ROLLOUT_TAGS

    client = _client()
    present = _registered(name).tags
    for key in ROLLOUT_TAGS:
        if key in present and key not in keep:
            client.delete_registered_model_tag(name, key)


def record_action(ref: ModelVersionRef, action: str, reason: str, trigger: str) -> None:
    """Put an action that moves no stage (a canary share, pause, approval, abort) into the history."""
    stage = describe_version(ref).stage
    _record_event(ref, stage, stage, reason, trigger, action)


def _registered(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model named {name!r}") from exc
