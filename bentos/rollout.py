"""Live progressive delivery, the ground floor shared by the router (bentos/router.py) and the release
flow (tasks/release/live.py): registry tag names, the routing state they spell, sticky routing and the
schema of one live request's outcome. Standard library and pydantic only.

The rollout is held in the registry as tags on the *registered model* (one ``get_registered_model``
answer per poll carries them together with the ``production`` / ``canary`` aliases), so every router
replica that polls the registry routes alike, and a restarted replica restores the share at once:

* ``lockgate.rollout.candidate``  the version the share belongs to (must still be aliased ``canary``,
  or, while watching after a promotion, be Production);
* ``lockgate.rollout.share``      percent of live requests routed to it;
* ``lockgate.rollout.state``      ``running`` / ``paused`` / ``awaiting_approval`` / ``watching`` /
  ``aborting`` (abort asked: routers drop the share at once) / ``done``;
* ``lockgate.rollout.baseline``   the version the candidate is compared with (Production, or the
  previous Production while watching);
* ``lockgate.rollout.step``, ``lockgate.rollout.note``  for operators (`lockgate canary watch`);
* ``lockgate.rollout.approved_by`` / ``approved_at``, ``abort_reason``  operator actions.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

TAG_PREFIX = "lockgate.rollout."
TAG_CANDIDATE = TAG_PREFIX + "candidate"
TAG_SHARE = TAG_PREFIX + "share"
TAG_STATE = TAG_PREFIX + "state"
TAG_BASELINE = TAG_PREFIX + "baseline"
TAG_STEP = TAG_PREFIX + "step"
TAG_STEP_STARTED = TAG_PREFIX + "step_started"
TAG_NOTE = TAG_PREFIX + "note"
TAG_APPROVED_BY = TAG_PREFIX + "approved_by"
TAG_APPROVED_AT = TAG_PREFIX + "approved_at"
TAG_ABORT_REASON = TAG_PREFIX + "abort_reason"
ROLLOUT_TAGS = (
    TAG_CANDIDATE,
    TAG_SHARE,
    TAG_STATE,
    TAG_BASELINE,
    TAG_STEP,
    TAG_STEP_STARTED,
    TAG_NOTE,
    TAG_APPROVED_BY,
    TAG_APPROVED_AT,
    TAG_ABORT_REASON,
)
#: MLflow's conventional aliases, moved with the stage transitions (MLflow's UI and webhooks see only
#: aliases): ``champion`` is the Production version, ``challenger`` the candidate in Staging. Defined
#: here, the ground floor, because routers read them; the registry module imports them.
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

RolloutStatus = Literal["running", "paused", "awaiting_approval", "watching", "aborting", "done"]
#: States in which routers send the share to the candidate (a paused canary holds its share).
ROUTING_STATES: frozenset[str] = frozenset({"running", "paused", "awaiting_approval", "watching"})
Role = Literal["stable", "canary"]


@dataclass(frozen=True)
class Rollout:
    """What the registry says a router must do: serve ``stable`` and send ``share`` % to ``candidate``."""

    model: str
    stable: str | None  # the version every request not routed to the candidate goes to
    candidate: str | None = None
    share: float = 0.0
    state: str = "done"
    step: str = ""
    note: str = ""

    @property
    def routing(self) -> bool:
        """True when some live traffic goes to the candidate."""
        return self.candidate is not None and self.share > 0 and self.stable is not None


def parse_share(value: str | None) -> float:
    """A share tag as a percentage; 0 when absent or unreadable (fail safe: everything to stable)."""
    try:
        share = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(max(share, 0.0), 100.0) if share == share else 0.0


def rollout_from_registry(model: str, tags: Mapping[str, str], aliases: Mapping[str, str]) -> Rollout:
    """The routing a registered model's tags and aliases call for.

    A canary is routed only while its version still carries the ``canary`` alias (a rollback or an
    archived candidate removes it, so a router can never keep routing to a decided candidate) — or,
    in ``watching``, while the candidate is Production and the baseline is the previous version, which
    then serves the remaining share as the live baseline."""
    production = aliases.get(CHAMPION_ALIAS)
    production = str(production) if production is not None else None
    candidate = tags.get(TAG_CANDIDATE)
    state = tags.get(TAG_STATE, "done")
    share = parse_share(tags.get(TAG_SHARE))
    base = Rollout(model, production, state=state, step=tags.get(TAG_STEP, ""), note=tags.get(TAG_NOTE, ""))
    if candidate is None or state not in ROUTING_STATES or share <= 0:
        return base
    if state == "watching":
        baseline = tags.get(TAG_BASELINE)
        # the watched version is Production, or about to be (still aliased canary, the baseline still
        # Production): both route the same, so the promotion itself moves no user
        promoted = candidate == production and baseline != production
        promoting = str(aliases.get(CHALLENGER_ALIAS)) == candidate and baseline == production
        if not baseline or not (promoted or promoting):
            return base
        # After promotion the new Production gets ``share`` and the previous one the rest, as stable.
        return Rollout(model, baseline, candidate, share, state, base.step, base.note)
    if str(aliases.get(CHALLENGER_ALIAS)) != candidate or candidate == production:
        return base
    return Rollout(model, production, candidate, share, state, base.step, base.note)


# ------------------------------------------------------------------------------------------ routing
def bucket(key: str) -> float:
    """Stable position of a user/session key in [0, 100): the first 8 bytes of sha256, scaled.

    The replayed canary routes with this function too (tasks/release/canary_strategy.py), so a user
    lands in the same bucket in rehearsal and in production."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class WeightedSequence:
    """Draws in [0, 100) for requests without a key: a golden-ratio (Weyl) sequence from a random start.

    Its draws are evenly spread at every length (discrepancy O(log n / n)), so the share of keyless
    requests routed to the canary is the step's share within a fraction of a point after a few hundred
    requests — where independent random draws wander by ±sqrt(p(1-p)/n) (±2 points at 50 % after 600).
    This is weighted round-robin, as Envoy's weighted clusters do, without a per-share cycle to reset."""

    _STEP = 0.6180339887498949  # the golden ratio's fractional part

    def __init__(self, seed: float | None = None) -> None:
        self._x = random.random() if seed is None else seed % 1.0
        self._lock = threading.Lock()

    def draw(self) -> float:
        with self._lock:
            self._x = (self._x + self._STEP) % 1.0
            return self._x * 100


def choose_role(key: str | None, share: float, sequence: WeightedSequence | None = None) -> tuple[Role, bool]:
    """Which arm answers a request, and whether the choice was sticky.

    A key (user id or session) is routed by consistent hash: ``bucket(key) < share`` goes to the
    canary, so as the share grows a canary user stays and the canary's user set only grows, and every
    replica routes a user alike. A request without a key is routed by weight."""
    if share <= 0:
        return "stable", key is not None
    if key is not None:
        return ("canary" if bucket(key) < share else "stable"), True
    draw = sequence.draw() if sequence is not None else random.random() * 100
    return ("canary" if draw < share else "stable"), False


# ------------------------------------------------------------------------------- live outcome row
Outcome = Literal["ok", "failover", "failed"]
"""``ok``: the routed arm answered; ``failover``: the canary could not and stable answered the same
request; ``failed``: the user got no answer (stable failed, or both did)."""


@dataclass(frozen=True)
class LiveRow:
    """One live request as the router saw it. ``role``/``version`` name the arm it was *routed* to,
    ``arm_ok`` / ``latency_ms`` / ``status_code`` that arm's own attempt (what the analysis judges);
    ``outcome`` and ``answered_version`` what the user got (a failover is stable's answer)."""

    ts: float
    request_id: str
    replica: str
    model_name: str
    version: str
    role: Role
    sticky: bool
    user_hash: str | None
    outcome: Outcome
    arm_ok: bool
    status_code: int
    latency_ms: float
    total_ms: float
    answered_version: str | None
    ttft_ms: float | None = None
    output_tokens: int | None = None
    empty: bool | None = None
    error: str | None = None


LIVE_COLUMNS: tuple[str, ...] = tuple(LiveRow.__dataclass_fields__)
