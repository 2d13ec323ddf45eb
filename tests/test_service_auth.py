"""API keys (stored hashed), per-key rate limits and cost accounting, against a real server."""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import run_cli
from lockgate.bentos.auth import KeyStore, TokenBucket, add_key, hash_key
from lockgate.bentos.config import ServiceConfig
from lockgate.tasks.release.serving import ServiceProcess, start_services

PROMPT = {"prompt": "Q: what is 1 plus 1?\nA:", "max_new_tokens": 2}


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=2.0, tokens=2.0, updated=0.0)
    assert [bucket.take(now=0.0), bucket.take(now=0.0)] == [0.0, 0.0]
    assert bucket.take(now=0.0) == pytest.approx(0.5)  # one token per 0.5 s
    assert bucket.take(now=0.5) == 0.0


def test_key_file_stores_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = add_key(path, "team-a", rate_per_s=1, burst=1)
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    store = KeyStore.from_file(path)
    assert store.admit(f"Bearer {key}").status == 200
    assert store.admit("Bearer nope").status == 401
    assert store.admit(None).status == 401
    path.write_text(json.dumps({"keys": [{"customer": "x"}]}))
    with pytest.raises(ValueError, match="LOCKGATE_API_KEYS_FILE"):
        KeyStore.from_file(path)


@pytest.fixture(scope="module")
def keyed_service(
    tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path
) -> Iterator[tuple[ServiceProcess, str, str]]:
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys.json"
    fast = add_key(keys, "team-fast", rate_per_s=100, burst=100)
    slow = add_key(keys, "team-slow", rate_per_s=0.2, burst=2)
    config = ServiceConfig.model_validate(
        {"pricing": {"prompt_per_1k_tokens": 1.0, "completion_per_1k_tokens": 2.0}, "warmup_requests": 1}
    )
    [service] = start_services(
        [
            {
                "target": "lockgate.bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": str(tiny_llm_dir),
                "request_log": root / "requests.sqlite",
                "log_dir": root / "logs",
                "api_keys_file": keys,
                "config": config,
            }
        ]
    )
    with service:
        yield service, fast, slow


def test_requests_need_a_valid_key(keyed_service: tuple[ServiceProcess, str, str]) -> None:
    service, fast, _ = keyed_service
    missing = httpx.post(f"{service.url}/generate", json=PROMPT, timeout=30)
    assert missing.status_code == 401 and missing.json()["field"] == "authorization"
    wrong = httpx.post(
        f"{service.url}/generate", json=PROMPT, headers={"Authorization": "Bearer x"}, timeout=30
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown API key"
    ok = httpx.post(
        f"{service.url}/generate", json=PROMPT, headers={"Authorization": f"Bearer {fast}"}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200  # probes need no key


def test_rate_limit_answers_429_with_retry_after(keyed_service: tuple[ServiceProcess, str, str]) -> None:
    service, _, slow = keyed_service
    headers = {"Authorization": f"Bearer {slow}"}
    codes = [
        httpx.post(f"{service.url}/generate", json=PROMPT, headers=headers, timeout=30) for _ in range(4)
    ]
    assert [r.status_code for r in codes] == [200, 200, 429, 429]
    assert int(codes[2].headers["Retry-After"]) >= 1


def test_metrics_carry_cost_per_customer_and_latency_breakdown(
    keyed_service: tuple[ServiceProcess, str, str],
) -> None:
    service, fast, _ = keyed_service
    httpx.post(
        f"{service.url}/generate", json=PROMPT, headers={"Authorization": f"Bearer {fast}"}, timeout=30
    )
    text = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {fast}"}, timeout=10).text
    cost_lines = [
        line
        for line in text.splitlines()
        if line.startswith("llm_api_cost_dollars_total{") and "team-fast" in line
    ]
    assert cost_lines and float(cost_lines[0].rsplit(" ", 1)[1]) > 0
    for name in (
        "llm_time_to_first_token_seconds_count",
        "llm_queue_wait_seconds_count",
        'llm_memory_usage_bytes{type="cpu_rss"}',
        "llm_requests_total{model=",
    ):
        assert name in text, name
    assert 'status="rejected"' in text  # the 401s and 429s are counted


def test_metrics_hide_customers_from_callers_without_a_key(
    keyed_service: tuple[ServiceProcess, str, str],
) -> None:
    service, fast, _ = keyed_service
    httpx.post(
        f"{service.url}/generate", json=PROMPT, headers={"Authorization": f"Bearer {fast}"}, timeout=30
    )
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        text = httpx.get(f"{service.url}/metrics", headers=headers, timeout=10).text
        assert "llm_requests_total{" in text  # the rest of the metrics are still there
        assert "team-fast" not in text and 'customer="' not in text
    keyed = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {fast}"}, timeout=10)
    assert 'customer="team-fast"' in keyed.text


def test_requests_with_unknown_keys_are_rate_limited(keyed_service: tuple[ServiceProcess, str, str]) -> None:
    service, fast, _ = keyed_service

    def guess(i: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer guess-{i}"}
        return httpx.post(f"{service.url}/generate", json=PROMPT, headers=headers, timeout=30)

    # At once: the budget for failed attempts is 10 at once + 1/s, whatever the machine's load.
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(guess, range(40)))
    statuses = [r.status_code for r in codes]
    assert 401 in statuses and 429 in statuses and set(statuses) == {401, 429}, statuses
    limited = next(r for r in codes if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    # A valid key is not affected by someone else's guessing from the same address.
    ok = httpx.post(
        f"{service.url}/generate", json=PROMPT, headers={"Authorization": f"Bearer {fast}"}, timeout=30
    )
    assert ok.status_code == 200, ok.text


def test_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "home" / "api-keys.json"
    add_key(path, "team-a", rate_per_s=1, burst=1)
    add_key(path, "team-b", rate_per_s=1, burst=1)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(json.loads(path.read_text())["keys"]) == 2


def test_keys_add_writes_under_lockgate_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_API_KEYS_FILE"}
    env["LOCKGATE_HOME"] = str(home)
    result = run_cli("keys", "add", "team-c", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    stored = home / "api-keys.json"
    assert stored.is_file() and stored.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / ".lockgate").exists()  # not the current directory
    key = result.stdout.split()[0]
    assert KeyStore.from_file(stored).admit(f"Bearer {key}").status == 200
