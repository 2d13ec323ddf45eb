"""The production entry point (bentos/router.py) on real per-version services on loopback, driven by a
user-traffic generator: registry-held share, sticky users, failover, restart, two replicas."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest

import live_support
from live_support import live_model, routers, spawning_router_env, start_router, wait_for
from lockgate.bentos.live_log import read_live_rows
from lockgate.bentos.live_store import open_live_store
from lockgate.bentos.rollout import TAG_BASELINE, TAG_CANDIDATE, TAG_SHARE, TAG_STATE, bucket
from lockgate.tasks.platform import model_registry as registry
from lockgate.tasks.release.live_traffic import UserTraffic

pytestmark = pytest.mark.slow
live_services = live_support.live_services  # the module-scoped services fixture
team_live_url = live_support.team_live_url  # a PostgreSQL cluster like the team stack's


def _set_share(name: str, candidate: str, share: float, baseline: str = "1") -> None:
    registry.set_rollout(
        name,
        {TAG_CANDIDATE: candidate, TAG_BASELINE: baseline, TAG_SHARE: f"{share:g}", TAG_STATE: "running"},
    )


def _followed(replicas: list, share: float) -> bool:
    return all(r.rollout()["rollout"]["share"] == share for r in replicas)


def test_share_sticky_users_and_two_replicas(live_services: dict, tiny_llm_dir: Path, tmp_path: Path) -> None:
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    live_dir = tmp_path / "live"
    with routers(name, backends, live_dir, replicas=2) as replicas:
        # No share in the registry: every request is answered by Production.
        answer = httpx.post(
            f"{replicas[0].url}/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=30
        )
        assert answer.status_code == 200
        assert answer.headers["x-lockgate-version"] == "1" and answer.headers["x-lockgate-role"] == "stable"
        assert answer.json()["lockgate_route"] == {
            "version": "1",
            "role": "stable",
            "failover": False,
            "replica": "r0",
        }

        traffic = UserTraffic(
            [r.url for r in replicas], users=300, rate_per_s=40, anonymous_share=0.5, concurrency=16
        )
        on_canary: set[str] = set()
        for share in (10, 30, 50):
            _set_share(name, "2", share)
            wait_for(lambda s=share: _followed(replicas, s), 5, f"both replicas at {share}%")
            records = traffic.run(12)
            assert records and not [r for r in records if r.failed], "every user request answered"
            anonymous = [r for r in records if r.user_id is None]
            observed = 100 * sum(r.role == "canary" for r in anonymous) / len(anonymous)
            print(
                f"step {share}%: {len(records)} requests, unsticky canary {observed:.1f}% of {len(anonymous)}"
            )
            assert abs(observed - share) <= 3, f"unsticky share {observed:.1f}% at step {share}%"
            by_user: dict[str, set[str]] = defaultdict(set)
            for r in records:
                if r.user_id is not None:
                    by_user[r.user_id].add(r.role)
            for user, roles in by_user.items():
                # consistent hash: the same user, on either replica, always the same arm at a share
                assert roles == {"canary" if bucket(user) < share else "stable"}, user
                if user in on_canary:
                    assert roles == {"canary"}, f"{user} moved back to stable at {share}%"
            on_canary |= {user for user, roles in by_user.items() if roles == {"canary"}}
            replica_of = {r.url for r in records if r.user_id is not None}
            assert len(replica_of) == 2, "traffic went through both replicas"
        rows = read_live_rows(live_dir, name)
        assert {row.replica for row in rows} == {"r0", "r1"}
        assert len(rows) == len(traffic.records) + 1
        assert {(row.role, row.version) for row in rows} == {("stable", "1"), ("canary", "2")}
        assert all(row.latency_ms > 0 and row.output_tokens is not None for row in rows)


def test_failing_candidate_fails_over_with_zero_failed_user_requests(
    live_services: dict, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["flaky"]}
    live_dir = tmp_path / "live"
    with routers(name, backends, live_dir, replicas=2) as replicas:
        _set_share(name, "2", 50)
        wait_for(lambda: _followed(replicas, 50), 5, "replicas at 50%")
        records = UserTraffic([r.url for r in replicas], users=200, rate_per_s=40, anonymous_share=0.2).run(
            15
        )
    assert records and [r for r in records if r.failed] == [], "zero failed user requests"
    failovers = [r for r in records if r.failover]
    assert failovers and all(r.version == "1" and r.role == "stable" for r in failovers)
    rows = read_live_rows(live_dir, name)
    canary_rows = [row for row in rows if row.role == "canary"]
    failed_arm = [row for row in canary_rows if not row.arm_ok]
    assert {row.outcome for row in failed_arm} == {"failover"} and all(
        row.status_code == 500 for row in failed_arm
    )
    assert 0.1 <= len(failed_arm) / len(canary_rows) <= 0.3, "the candidate's own failures are logged (~20 %)"
    assert len(failovers) == len(failed_arm)


def test_two_replicas_log_to_the_shared_postgres_table(
    live_services: dict, tiny_llm_dir: Path, tmp_path: Path, team_live_url: str
) -> None:
    """Team mode: both replicas' rows land in one table (no per-replica files); the release's reader
    sees both, through the same setting."""
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    live_dir = tmp_path / "live"
    shared = {"LOCKGATE_LIVE_LOG_URL": team_live_url}
    _set_share(name, "2", 50)
    replicas = [start_router(name, f"r{i}", backends, live_dir, extra_env=shared) for i in range(2)]
    try:
        records = UserTraffic([r.url for r in replicas], users=40, rate_per_s=20, anonymous_share=0.5).run(4)
    finally:
        for router in replicas:
            router.stop()  # a graceful stop flushes the batching writer
    assert records and not [r for r in records if r.failed]
    rows = open_live_store(team_live_url, live_dir).read_rows(name)
    assert len(rows) == len(records) and {row.replica for row in rows} == {"r0", "r1"}
    assert {row.role for row in rows} == {"stable", "canary"}
    assert not list(live_dir.glob("*.db")), "team mode writes no per-replica SQLite files"


def test_router_restarted_mid_canary_restores_the_share(
    live_services: dict, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    live_dir = tmp_path / "live"
    _set_share(name, "2", 40)
    router = start_router(name, "r0", backends, live_dir)
    try:
        assert router.rollout()["rollout"]["share"] == 40
        router.stop()
        router = start_router(name, "r0", backends, live_dir)
        # Ready means routed as the registry says: no request is answered under a forgotten share.
        state = router.rollout()
        assert state["rollout"]["share"] == 40 and state["rollout"]["candidate"] == "2"
        users = [f"u{i}" for i in range(200)]
        roles = {
            u: httpx.post(
                f"{router.url}/generate", json={"prompt": "x", "max_new_tokens": 1, "user_id": u}, timeout=30
            ).headers["x-lockgate-role"]
            for u in users
        }
        assert all(role == ("canary" if bucket(u) < 40 else "stable") for u, role in roles.items())
        # a candidate whose canary alias is gone (rolled back) gets nothing, whatever the share tag says
        registry.roll_back_candidate(registry.ModelVersionRef(name, "2"), "test")
        wait_for(lambda: router.rollout()["routing"] is False, 5, "routing stopped")
    finally:
        router.stop()


def test_router_starts_each_versions_service_from_the_registry(
    tmp_path: Path, tiny_llm_dir: Path, tracking: str
) -> None:
    """What `lockgate serve` runs: no fixed backends; the router starts a service per version it needs
    (Production, then the candidate once it has a share), each loading its version from the registry."""
    import mlflow

    name = f"spawn-{tmp_path.name[-8:]}".replace("_", "-")
    with mlflow.start_run(run_name="spawn-test"):
        stable = registry.log_model_version(tiny_llm_dir, name, {})
        candidate = registry.log_model_version(tiny_llm_dir, name, {})
    registry.promote_first_production(stable, "test baseline")
    env = spawning_router_env(tmp_path)
    router = start_router(name, "r0", None, tmp_path / "live", ready_timeout_s=240, extra_env=env)
    try:
        body = {"prompt": "Q: what is 1 plus 1?\nA:", "max_new_tokens": 2, "user_id": "u1"}
        answer = httpx.post(f"{router.url}/generate", json=body, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-lockgate-version"] == stable.version
        registry.stage_candidate(candidate, "test candidate")
        _set_share(name, candidate.version, 100, baseline=stable.version)
        # until the candidate's service is ready its share is answered by Production, never refused
        deadline = time.monotonic() + 240
        versions = set()
        while time.monotonic() < deadline and candidate.version not in versions:
            answer = httpx.post(f"{router.url}/generate", json=body, timeout=60)
            assert answer.status_code == 200
            versions.add(answer.headers["x-lockgate-version"])
            time.sleep(0.5)
        assert versions == {stable.version, candidate.version}
        assert answer.json()["lockgate_route"]["role"] == "canary"
        # each spawned service names itself by the registered model: the id an OpenAI client sends
        listed = httpx.get(f"{router.url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["metadata"]["role"], m["metadata"]["version"]) for m in listed] == [
            (name, "stable", stable.version),
            (name, "canary", candidate.version),
        ]
        chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u1"}
        answer = httpx.post(f"{router.url}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-lockgate-version"] == candidate.version
        registry.roll_back_candidate(candidate, "test over")
        spawned = router.rollout()["services"]
        assert set(spawned) == {stable.version, candidate.version}
        wait_for(
            lambda: set(router.rollout()["services"]) == {stable.version}, 30, "candidate service stopped"
        )
        wait_for(
            lambda: not Path(f"/proc/{spawned[candidate.version]['pid']}").exists(), 30, "its process gone"
        )
    finally:
        router.stop()


def test_openai_sdk_through_the_router(live_services: dict, tiny_llm_dir: Path, tmp_path: Path) -> None:
    """The production router speaks the OpenAI API to the official SDK: /v1/models lists Production
    and, during a canary, the candidate; chat is routed by ``user`` (sticky); a stream is passed
    through chunk by chunk, ending with usage and ``data: [DONE]``."""
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    live_dir = tmp_path / "live"
    with routers(name, backends, live_dir, replicas=1) as [router]:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)

        def listed() -> list[tuple[str, str, str]]:
            models = client.models.list().data
            return [(m.owned_by, m.metadata["role"], m.metadata["version"]) for m in models]  # type: ignore[attr-defined]

        assert listed() == [("lockgate-stable", "stable", "1")], "no share: Production only"
        _set_share(name, "2", 50)
        wait_for(lambda: _followed([router], 50), 5, "router at 50%")
        assert listed() == [("lockgate-stable", "stable", "1"), ("lockgate-canary", "canary", "2")]
        model = client.models.list().data[0].id

        users = [f"user-{i}" for i in range(16)]
        for user in users:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, user=user
            )
            chat = raw.parse()
            assert chat.object == "chat.completion" and chat.usage is not None
            expected = "canary" if bucket(user) < 50 else "stable"
            assert raw.headers["x-lockgate-role"] == expected, user
            assert raw.headers["x-lockgate-version"] == ("2" if expected == "canary" else "1")

        canary_user = next(u for u in users if bucket(u) < 50)
        stream = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "count to ten"}], max_tokens=24,
            temperature=0, stream=True, stream_options={"include_usage": True}, user=canary_user,
        )  # fmt: skip
        assert stream.headers["x-lockgate-role"] == "canary"
        assert stream.headers["content-type"].startswith("text/event-stream")
        chunks = list(stream.parse())
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(deltas) >= 2, f"several content chunks: {deltas}"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens >= len(deltas)

        # On the wire: events arrive as the service sends them (no whole-answer buffering), then [DONE].
        body = {
            "model": model, "messages": [{"role": "user", "content": "count to ten"}], "max_tokens": 48,
            "temperature": 0, "stream": True, "user": canary_user,
        }  # fmt: skip
        arrivals: list[tuple[float, bytes]] = []
        with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body, timeout=60) as answer:
            assert answer.status_code == 200
            for piece in answer.iter_raw():
                arrivals.append((time.perf_counter(), piece))
        wire = b"".join(piece for _, piece in arrivals)
        assert wire.endswith(b"data: [DONE]\n\n")
        print(f"stream: {len(arrivals)} reads over {1000 * (arrivals[-1][0] - arrivals[0][0]):.0f} ms")
        assert len(arrivals) >= 3, f"the stream came in {len(arrivals)} read(s): buffered, not passed through"
        assert arrivals[-1][0] - arrivals[0][0] > 0

    rows = sorted(read_live_rows(live_dir, name), key=lambda row: row.ts)
    assert len(rows) == len(users) + 2 and all(row.outcome == "ok" for row in rows)
    assert all(row.output_tokens is not None and row.empty is not None for row in rows[: len(users)])
    sdk_stream, wire_stream = rows[-2:]
    assert sdk_stream.role == "canary" and sdk_stream.output_tokens == chunks[-1].usage.completion_tokens
    assert wire_stream.output_tokens is None, "no usage chunk asked for: the router does not guess"
    assert all(row.ttft_ms is not None and row.empty is False for row in (sdk_stream, wire_stream))


def test_a_request_pinning_a_version_by_model_name_gets_that_version(
    live_services: dict, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    """``model: NAME:VERSION`` (as /v1/models names each version) is answered by that version whatever
    the user's bucket; an unknown version is refused by the service naming ``model``."""
    name, _ = live_model(tiny_llm_dir)
    backends = {"1": live_services["stable"], "2": live_services["candidate"]}
    with routers(name, backends, tmp_path / "live", replicas=1) as [router]:
        _set_share(name, "2", 10)
        wait_for(lambda: _followed([router], 10), 5, "router at 10%")
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stable_user = next(f"user-{i}" for i in range(100) if bucket(f"user-{i}") >= 10)
        canary_user = next(f"user-{i}" for i in range(100) if bucket(f"user-{i}") < 10)
        for user, pinned, role in ((stable_user, "2", "canary"), (canary_user, "1", "stable")):
            raw = client.chat.completions.with_raw_response.create(
                model=f"{model}:{pinned}",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                user=user,
            )
            assert (raw.headers["x-lockgate-role"], raw.headers["x-lockgate-version"]) == (role, pinned), user
            assert raw.parse().choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="model"):
            client.chat.completions.create(
                model=f"{model}:9",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                user=stable_user,
            )
