"""Feature flags: consistent hashing on the user id, monotone rollouts, changes without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bentos.feature_flags import FeatureFlags, FlagFileError, bucket, remove_flag, set_flag


def test_same_user_same_answer_and_rollout_only_adds_users(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    users = [f"user-{i}" for i in range(5000)]
    previous: set[str] = set()
    for rollout in (1, 10, 25, 50, 100):
        set_flag(path, "new_sampler", rollout)
        flags = FeatureFlags(path, check_every_s=0)
        on = {u for u in users if flags.is_enabled("new_sampler", u)}
        assert previous <= on  # nobody who had the feature loses it
        assert abs(len(on) / len(users) - rollout / 100) < 0.02
        assert {u for u in users if flags.is_enabled("new_sampler", u)} == on  # same answer again
        previous = on
    assert previous == set(users)


def test_flags_are_independent_and_anonymous_requests_need_100_percent(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_flag(path, "a", 50)
    set_flag(path, "b", 50)
    flags = FeatureFlags(path, check_every_s=0)
    users = [f"u{i}" for i in range(4000)]
    both = sum(flags.is_enabled("a", u) and flags.is_enabled("b", u) for u in users) / len(users)
    assert 0.22 < both < 0.28  # independent halves overlap in a quarter, not a half
    assert bucket("a", "u1") != bucket("b", "u1")
    assert not flags.is_enabled("a", None)
    assert not flags.is_enabled("unknown-flag", "u1")
    set_flag(path, "a", 100)
    assert flags.is_enabled("a", None)
    set_flag(path, "a", 100, enabled=False)
    assert not flags.is_enabled("a", "u1")


def test_changes_apply_without_a_restart_and_a_broken_file_keeps_the_last_flags(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_flag(path, "attention_optimization", 0, description="chapter 9.5.3")
    flags = FeatureFlags(path, check_every_s=0)  # one long-lived instance, as a service holds it
    assert not flags.is_enabled("attention_optimization", "alice")
    set_flag(path, "attention_optimization", 100)
    assert flags.is_enabled("attention_optimization", "alice")
    assert flags.flags()["attention_optimization"].description == "chapter 9.5.3"

    path.write_text('{"version": 1, "flags": {"attention_optimization": {"rollout": 150}}}')
    assert flags.is_enabled("attention_optimization", "alice")  # last valid flags stay in force
    assert flags.error is not None and "rollout" in flags.error
    with pytest.raises(FlagFileError, match="rollout"):
        FeatureFlags(path)  # at start-up an invalid file is an error


def test_removal_and_reload_interval(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_flag(path, "x", 100)
    flags = FeatureFlags(path, check_every_s=3600)
    set_flag(path, "x", 0)
    assert flags.is_enabled("x", "u")  # not re-checked within the interval
    flags.check_every_s = 0
    assert not flags.is_enabled("x", "u")
    assert remove_flag(path, "x") and not remove_flag(path, "x")
    assert flags.flags() == {}
    assert FeatureFlags.from_env({}) is None
    assert FeatureFlags.from_env({"LOCKGATE_FEATURE_FLAGS_FILE": os.fspath(path)}) is not None
