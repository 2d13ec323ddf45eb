"""Response cache for deterministic requests (greedy decoding): the same prompt, budget and stop strings
on the same model version and calibration give the same answer, so it is served without the model.

Backends: an in-process LRU (default) or Redis (shared by every replica; entries expire after a TTL).
Only greedy requests are cached; the key holds everything the answer depends on, the version included,
so a hot swap or a canary never serves another version's answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from lockgate.bentos.config import ResponseCacheConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    """What a response needs from a generation (timings are the cache's own)."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    confidence: float | None


class ResponseCache(Protocol):
    def get(self, key: str) -> CachedAnswer | None: ...

    def put(self, key: str, answer: CachedAnswer) -> None: ...


def cache_key(
    version: str, calibration: float, prompt: str, max_new_tokens: int, stop: tuple[str, ...]
) -> str:
    """Everything a greedy answer depends on, hashed (prompts can be long; keys stay 64 chars)."""
    material = json.dumps([version, calibration, prompt, max_new_tokens, list(stop)], ensure_ascii=False)
    return "lockgate:response:" + hashlib.sha256(material.encode()).hexdigest()


class LRUCache:
    """In-process least-recently-used cache, safe across threads."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._items: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            answer = self._items.get(key)
            if answer is not None:
                self._items.move_to_end(key)
            return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        with self._lock:
            self._items[key] = answer
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class RedisCache:
    """Entries as JSON strings with a TTL. A Redis outage makes lookups misses (logged): the model
    still answers; the cache is an optimisation, never a dependency of serving."""

    def __init__(self, url: str, ttl_s: int) -> None:
        import redis

        self._client: Any = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._ttl_s = ttl_s
        self._url = url

    def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = self._client.get(key)
        except Exception as exc:  # redis.RedisError and socket errors
            logger.warning("response cache %s unavailable (%s): treated as a miss", self._url, exc)
            return None
        return None if raw is None else CachedAnswer(**json.loads(raw))

    def put(self, key: str, answer: CachedAnswer) -> None:
        try:
            self._client.set(key, json.dumps(asdict(answer)), ex=self._ttl_s)
        except Exception as exc:
            logger.warning("response cache %s unavailable (%s): answer not stored", self._url, exc)


def build_cache(config: ResponseCacheConfig) -> ResponseCache | None:
    """The configured cache, or None when disabled; raises ValueError for a redis backend without URL."""
    if not config.enabled:
        return None
    if config.backend == "redis":
        if not config.redis_url:
            raise ValueError("response_cache.redis_url: required when response_cache.backend is redis")
        return RedisCache(config.redis_url.get_secret_value(), config.ttl_s)
    return LRUCache(config.max_entries)
