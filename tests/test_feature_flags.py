"""Feature flags: consistent hashing on the user id, monotone rollouts, changes without a restart, and
what the service does with them (unit, then through real HTTP to a running service)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from lockgate.bentos.config import ServiceConfig, ServiceEnv
from lockgate.bentos.feature_flags import (
    FeatureFlags,
    FlagFileError,
    FlagPolicy,
    apply_service_flags,
    bucket,
    remove_flag,
    set_flag,
)


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
    assert FeatureFlags.from_env(ServiceEnv(feature_flags_file=path).to_env()) is not None


def test_service_flag_behaviours_only_narrow_a_request(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_flag(path, "max_new_tokens_cap", 100, value=4)
    set_flag(path, "stop_at_newline", 100)
    set_flag(path, "some_app_flag", 100)  # not a service flag: evaluated for apps, no behaviour here
    flags = FeatureFlags(path, check_every_s=0).flags()
    policy = apply_service_flags(flags, "alice", 16, ("###",))
    assert policy == FlagPolicy(4, ("###", "\n"), ("max_new_tokens_cap", "stop_at_newline"))
    assert apply_service_flags(flags, "alice", 2, ("\n",)) == FlagPolicy(
        2, ("\n",), ("max_new_tokens_cap", "stop_at_newline")
    )  # a cap above the request's own budget changes nothing; the newline is not added twice
    set_flag(path, "max_new_tokens_cap", 30)
    set_flag(path, "stop_at_newline", 0)
    flags = FeatureFlags(path, check_every_s=0).flags()
    users = [f"user-{i}" for i in range(2000)]
    capped = {u for u in users if apply_service_flags(flags, u, 16, ()).max_new_tokens == 4}
    assert capped == {u for u in users if bucket("max_new_tokens_cap", u) < 30}
    assert apply_service_flags(flags, None, 16, ()) == FlagPolicy(16, (), ())  # anonymous: only at 100 %


def test_value_flags_need_a_value_and_switches_take_none(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    with pytest.raises(FlagFileError, match=r"max_new_tokens_cap\.value: required"):
        set_flag(path, "max_new_tokens_cap", 10)
    with pytest.raises(FlagFileError, match=r"stop_at_newline\.value: a switch flag takes no value"):
        set_flag(path, "stop_at_newline", 10, value=3)
    path.write_text('{"version": 1, "flags": {"max_new_tokens_cap": {"rollout": 5}}}')
    with pytest.raises(FlagFileError, match="required"):
        FeatureFlags(path)
    assert set_flag(path.with_name("other.json"), "max_new_tokens_cap", 10, value=8).value == 8


def _generate(client: httpx.Client, url: str, user: str) -> tuple[str, dict]:
    response = client.post(
        f"{url}/generate", json={"prompt": "hello world", "max_new_tokens": 6, "user_id": user}
    )
    assert response.status_code == 200, response.text
    return response.headers["x-lockgate-flags"], response.json()


@pytest.mark.slow
def test_flags_change_what_a_running_service_does_per_user_without_a_restart(
    tmp_path: Path, tiny_llm_dir: Path
) -> None:
    from lockgate.tasks.release.serving import launch_service, wait_ready

    path = tmp_path / "flags.json"
    set_flag(path, "max_new_tokens_cap", 50, value=1, description="one-token answers for half the users")
    service = launch_service(
        "lockgate.bentos.llm_service:LLMService",
        "flags",
        str(tiny_llm_dir),
        tmp_path / "requests.sqlite",
        tmp_path / "logs",
        feature_flags_file=path,
        config=ServiceConfig.model_validate({"warmup_requests": 1, "batching": {"max_latency_ms": 1}}),
        torch_threads=1,
    )
    users = [f"user-{i}" for i in range(16)]
    with service, httpx.Client(timeout=30) as client:
        wait_ready(service, 180)
        pid = service.process.pid
        on = {u for u in users if bucket("max_new_tokens_cap", u) < 50}
        assert 0 < len(on) < len(users)
        for user in users:
            first, answer = _generate(client, service.url, user)
            again, _ = _generate(client, service.url, user)
            assert first == again == ("max_new_tokens_cap" if user in on else "")  # same user, same answer
            if user in on:
                assert answer["output_tokens"] <= 1
        lengths_off = [_generate(client, service.url, u)[1]["output_tokens"] for u in users if u not in on]
        assert max(lengths_off) > 1  # the cap is what made the flagged answers short

        # Rollout to everyone, and a second flag: the running service follows within its 1 s re-read.
        set_flag(path, "max_new_tokens_cap", 100)
        set_flag(path, "stop_at_newline", 100)
        deadline = time.monotonic() + 10
        while _generate(client, service.url, users[0])[0] != "max_new_tokens_cap,stop_at_newline":
            assert time.monotonic() < deadline, "the flag change never reached the service"
            time.sleep(0.3)
        for user in users:
            header, answer = _generate(client, service.url, user)
            assert header == "max_new_tokens_cap,stop_at_newline"
            assert answer["output_tokens"] <= 1 and "\n" not in answer["text"]
        # Switched off for everyone; still the same process (no restart).
        set_flag(path, "max_new_tokens_cap", 100, enabled=False)
        set_flag(path, "stop_at_newline", 0)
        deadline = time.monotonic() + 10
        while _generate(client, service.url, users[0])[0] != "":
            assert time.monotonic() < deadline, "switching the flags off never reached the service"
            time.sleep(0.3)
        assert service.process.pid == pid and service.process.poll() is None
