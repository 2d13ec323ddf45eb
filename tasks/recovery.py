"""Recovery after a release that died mid-way (killed runner, lost machine): run holding its lock.

`lockgate run` calls it before every release and `lockgate canary recover MODEL` on demand, so a
restart always starts from a consistent registry: the dead release's services are stopped, a
half-done promotion is completed, a candidate whose canary never reached a decision is rolled back
(:func:`tasks.registry.repair_interrupted`) — never two Production versions.
"""

from __future__ import annotations

from tasks import registry
from tasks.log import get_logger
from tasks.release_lock import LockInfo
from tasks.serving import stop_orphaned_services

log = get_logger(__name__)


def recover_interrupted(model: str, replaced: LockInfo | None, trigger: str) -> list[str]:
    """Repair what a killed release of ``model`` left; ``replaced`` is the stale lock taken over, if any.

    Returns one line per action (empty when there was nothing to do)."""
    actions: list[str] = []
    if replaced is not None:
        actions.append(
            f"took over the {replaced.state()} release lock of {replaced.owner} ({replaced.phase})"
        )
        stopped = stop_orphaned_services(replaced.services, model)
        actions += [f"stopped orphaned service process group {pgid}" for pgid in stopped]
    if model in registry.registered_model_names():
        why = "release interrupted" + (f" ({replaced.owner}, {replaced.phase})" if replaced else "")
        actions += registry.repair_interrupted(model, why, trigger)
    for action in actions:
        log.warning("recovery of %s: %s", model, action)
    return actions
