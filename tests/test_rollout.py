"""The ground floor of live delivery, without servers: what the registry's tags route, sticky and
weighted routing, and the per-replica live logs the release reads (bentos/rollout.py, bentos/live_log.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lockgate.bentos.live_log import LiveLog, LiveTail, read_live_rows, replica_log_path
from lockgate.bentos.rollout import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    TAG_BASELINE,
    TAG_CANDIDATE,
    TAG_SHARE,
    TAG_STATE,
    LiveRow,
    WeightedSequence,
    bucket,
    choose_role,
    rollout_from_registry,
)
from lockgate.tasks.release.canary_strategy import user_bucket

ALIASES = {CHAMPION_ALIAS: "1", CHALLENGER_ALIAS: "2"}


def _tags(state: str = "running", share: str = "25", candidate: str = "2") -> dict[str, str]:
    return {TAG_CANDIDATE: candidate, TAG_SHARE: share, TAG_STATE: state, TAG_BASELINE: "1"}


def test_registry_tags_route_only_a_live_canary() -> None:
    rollout = rollout_from_registry("m", _tags(), ALIASES)
    assert (rollout.stable, rollout.candidate, rollout.share, rollout.routing) == ("1", "2", 25.0, True)
    assert rollout_from_registry("m", _tags(state="paused"), ALIASES).share == 25  # a pause holds the share
    # aborting, done, no canary alias (rolled back), a bad share: everything to Production
    for tags, aliases in [
        (_tags(state="aborting"), ALIASES),
        (_tags(state="done"), ALIASES),
        (_tags(), {CHAMPION_ALIAS: "1"}),
        (_tags(share="lots"), ALIASES),
        (_tags(candidate="3"), ALIASES),
        ({}, ALIASES),
    ]:
        rollout = rollout_from_registry("m", tags, aliases)
        assert not rollout.routing and rollout.stable == "1", tags
    # after promotion the previous version serves the rest as the live baseline
    watching = rollout_from_registry("m", {**_tags(state="watching", share="90")}, {CHAMPION_ALIAS: "2"})
    assert (watching.stable, watching.candidate, watching.share) == ("1", "2", 90.0)
    # set before the promotion: the same routing, so promoting moves nobody
    assert rollout_from_registry("m", _tags(state="watching", share="90"), ALIASES) == watching
    # rolled back after the watch (Production is the baseline again): everything to it
    assert not rollout_from_registry("m", _tags(state="watching", share="90"), {CHAMPION_ALIAS: "1"}).routing


def test_sticky_users_only_grow_and_match_the_replayed_canary() -> None:
    users = [f"user-{i}" for i in range(5000)]
    assert all(bucket(u) == user_bucket(u) for u in users[:100]), "rehearsal and production agree"
    previous: set[str] = set()
    for share in (1, 5, 10, 25, 50, 100):
        on = {u for u in users if choose_role(u, share)[0] == "canary"}
        assert previous <= on, f"a canary user moved back at {share}%"
        assert abs(100 * len(on) / len(users) - share) < 2.5
        previous = on
    assert choose_role("user-1", 0) == ("stable", True)


@pytest.mark.parametrize("share", [1, 5, 20, 50, 90])
def test_weighted_sequence_keeps_the_share_of_anonymous_requests(share: float) -> None:
    sequence = WeightedSequence(0.123)
    for n in (100, 300, 1000):
        routed = [choose_role(None, share, sequence) for _ in range(n)]
        assert all(not sticky for _, sticky in routed)
        observed = 100 * sum(role == "canary" for role, _ in routed) / n
        assert abs(observed - share) <= 1.5, (share, n, observed)


def _row(ts: float, replica: str, role: str = "canary") -> LiveRow:
    return LiveRow(
        ts=ts,
        request_id=f"{replica}-{ts}",
        replica=replica,
        model_name="m",
        version="2" if role == "canary" else "1",
        role=role,  # type: ignore[arg-type]
        sticky=True,
        user_hash="abc",
        outcome="ok",
        arm_ok=True,
        status_code=200,
        latency_ms=12.5,
        total_ms=13.0,
        answered_version="2",
        output_tokens=3,
        empty=False,
    )


def test_live_logs_of_all_replicas_are_read_once_even_when_committed_late(tmp_path: Path) -> None:
    a, b = LiveLog(replica_log_path(tmp_path, "a")), LiveLog(replica_log_path(tmp_path, "b"))
    now = time.time()
    a.append(_row(now - 100, "a"))  # before the window: never read
    tail = LiveTail(tmp_path, "m", since=now - 10)
    a.append(_row(now, "a"))
    assert [r.replica for r in tail.read()] == ["a"]
    b.append(_row(now - 5, "b"))  # replica b commits a row older than what was read already
    a.append(_row(now + 1, "a", role="stable"))
    rows = tail.read()
    assert [(r.replica, r.role) for r in rows] == [("b", "canary"), ("a", "stable")]
    assert tail.read() == []
    assert rows[0] == _row(now - 5, "b"), "a row reads back exactly as written (booleans included)"
    assert len(read_live_rows(tmp_path, "m")) == 4 and len(read_live_rows(tmp_path, "m", since=now - 10)) == 3
    with pytest.raises(ValueError, match="replica id"):
        replica_log_path(tmp_path, "../escape")
