"""Recovery after a release that died mid-way (killed runner, lost machine): run holding its lock.

`lockgate run` calls :func:`recover_or_resume` before every release and `lockgate canary recover MODEL`
calls :func:`recover_interrupted` on demand, so a restart always starts from a consistent registry: the
dead release's services are stopped, a half-done promotion is completed, and a candidate whose canary
never reached a decision is either resumed (``canary.on_interrupt: resume``, the default, when the
persisted state allows it) or rolled back (:func:`tasks.platform.model_registry.repair_interrupted`) —
never two
Production versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.platform.log import get_logger
from lockgate.tasks.release.lock import LockInfo
from lockgate.tasks.release.serving import stop_orphaned_services
from lockgate.tasks.release.state import CanaryState, canary_spec_sha256, clear_state, load_state

if TYPE_CHECKING:
    from lockgate.flows.spec import CanarySpec

log = get_logger(__name__)


def _take_over(model: str, replaced: LockInfo | None) -> list[str]:
    """Stop the services of the release whose stale lock was taken over."""
    if replaced is None:
        return []
    actions = [f"took over the {replaced.state()} release lock of {replaced.owner} ({replaced.phase})"]
    stopped = stop_orphaned_services(replaced.services, model)
    return actions + [f"stopped orphaned service process group {pgid}" for pgid in stopped]


def _repair(model: str, replaced: LockInfo | None, trigger: str) -> list[str]:
    clear_state(model)  # whatever the canary had reached, it is not resumed now
    if model not in registry.registered_model_names():
        return []
    why = "release interrupted" + (f" ({replaced.owner}, {replaced.phase})" if replaced else "")
    return registry.repair_interrupted(model, why, trigger)


def recover_interrupted(model: str, replaced: LockInfo | None, trigger: str) -> list[str]:
    """Repair what a killed release of ``model`` left, rolling back an undecided candidate;
    ``replaced`` is the stale lock taken over, if any.

    Returns one line per action (empty when there was nothing to do)."""
    actions = _take_over(model, replaced) + _repair(model, replaced, trigger)
    for action in actions:
        log.warning("recovery of %s: %s", model, action)
    return actions


def why_not_resumable(state: CanaryState, replaced: LockInfo | None, spec: CanarySpec) -> str | None:
    """None when the persisted canary may be resumed, else why not.

    Resuming needs a release that died holding its lock (taken over now), the canary strategy, an
    unchanged canary section, and a registry exactly as the canary left it: the stable version the only
    Production version, the candidate still in Staging and undecided. Anything else means someone or
    something acted since, and the canary's evidence no longer describes the registry."""
    if spec.on_interrupt != "resume":
        return "canary.on_interrupt is rollback"
    if spec.strategy != "canary":
        return f"strategy {spec.strategy} is never resumed"
    if replaced is None:
        return "no interrupted release holds the lock (the last one ended without deciding)"
    if canary_spec_sha256(spec) != state.spec_sha256:
        return "the canary section of the spec changed since the canary started"
    model = state.candidate.name
    if model not in registry.registered_model_names():
        return f"no registered model {model}"
    versions = registry.list_versions(model)
    production = [v.version for v in versions if v.stage == "Production"]
    if production != [state.stable.version]:
        return f"Production is {production or 'empty'}, the canary compared with v{state.stable.version}"
    candidate = next((v for v in versions if v.version == state.candidate.version), None)
    if candidate is None or candidate.stage != "Staging":
        return f"candidate v{state.candidate.version} is no longer in Staging"
    decision = candidate.tags.get(registry.TAG_DECISION)
    if decision != "staged":
        return f"candidate v{state.candidate.version} is tagged {decision!r}, not 'staged'"
    return None


def recover_or_resume(
    model: str, replaced: LockInfo | None, trigger: str, spec: CanarySpec
) -> tuple[list[str], CanaryState | None]:
    """What `lockgate run` does before a release: the actions taken, and the canary to resume (or None:
    the registry was repaired and the release starts from the beginning)."""
    actions = _take_over(model, replaced)
    state = load_state(model)
    resumable = None
    if state is not None:
        why = why_not_resumable(state, replaced, spec)
        if why is None:
            resumable = state
            done = len(state.checkpoint.steps)
            actions.append(
                f"resuming the canary of v{state.candidate.version} after {done} of {len(spec.steps)} "
                f"completed step(s) (canary.on_interrupt: resume)"
            )
        else:
            actions.append(f"canary of v{state.candidate.version} not resumed: {why}")
    if resumable is None:
        actions += _repair(model, replaced, trigger)
    for action in actions:
        log.warning("recovery of %s: %s", model, action)
    return actions, resumable
