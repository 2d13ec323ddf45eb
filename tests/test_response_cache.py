"""Response-cache backends: the LRU and a real redis-server (Debian package, installed by `make test`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from lockgate.bentos.response_cache import CachedAnswer, LRUCache, RedisCache, cache_key

ANSWER = CachedAnswer("four", prompt_tokens=7, output_tokens=2, finish_reason="eos", confidence=0.91)


def test_key_changes_with_everything_the_answer_depends_on() -> None:
    base = cache_key("3", 1.0, "2+2=", 8, ("\n",))
    assert base == cache_key("3", 1.0, "2+2=", 8, ("\n",))
    variants = [
        cache_key("4", 1.0, "2+2=", 8, ("\n",)),  # another version (hot swap, canary)
        cache_key("3", 1.3, "2+2=", 8, ("\n",)),  # recalibrated confidence
        cache_key("3", 1.0, "2+2= ", 8, ("\n",)),
        cache_key("3", 1.0, "2+2=", 9, ("\n",)),
        cache_key("3", 1.0, "2+2=", 8, ()),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_lru_evicts_the_least_recently_used() -> None:
    cache = LRUCache(max_entries=2)
    cache.put("a", ANSWER)
    cache.put("b", ANSWER)
    assert cache.get("a") == ANSWER  # a is now the most recently used
    cache.put("c", ANSWER)
    assert cache.get("b") is None and cache.get("a") == ANSWER and cache.get("c") == ANSWER
    assert len(cache) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it: `make redis`)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_round_trip_and_ttl(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_s=1)
    cache.put("k", ANSWER)
    assert cache.get("k") == ANSWER
    assert RedisCache(redis_url, ttl_s=1).get("k") == ANSWER, "another replica sees the entry"
    time.sleep(1.2)
    assert cache.get("k") is None, "entries expire after ttl_s"


def test_redis_outage_is_a_miss_not_an_error() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{_free_port()}/0", ttl_s=60)  # nothing listens there
    cache.put("k", ANSWER)
    assert cache.get("k") is None
