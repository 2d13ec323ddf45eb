"""API keys (stored hashed), per-key rate limits and cost accounting, against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bentos.auth import KeyStore, TokenBucket, add_key, hash_key
from tasks.serving import ServiceProcess, start_services

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
    config = {"price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 2.0, "warmup_requests": 1}
    [service] = start_services(
        [
            {
                "target": "bentos.llm_service:LLMService",
                "role": "stable",
                "model_uri": str(tiny_llm_dir),
                "request_log": root / "requests.sqlite",
                "log_dir": root / "logs",
                "extra_env": {
                    "LOCKGATE_API_KEYS_FILE": str(keys),
                    "LOCKGATE_SERVICE_CONFIG": json.dumps(config),
                },
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
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
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
