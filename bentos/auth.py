"""API keys (stored hashed) and per-key token-bucket rate limits for the LLM service.

The key file (``LOCKGATE_API_KEYS_FILE``) is JSON::

    {"keys": [{"customer": "team-a", "sha256": "<hex of sha256(key)>", "rate_per_s": 5, "burst": 10}]}

Only hashes are stored; the file is still written readable by its owner only (0600).
``lockgate keys add`` writes entries (under ``LOCKGATE_HOME``) and prints the key once. Without a key
file the service is open (development, loopback only: ``lockgate serve`` refuses to bind another address
without keys); with one, every request needs ``Authorization: Bearer <key>``.

Requests without a valid key are rate-limited too, per client address (:data:`UNKNOWN_KEY_RATE_PER_S`):
guessing keys gets 429 with Retry-After, not an endless stream of cheap 401s.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lockgate.bentos.config import API_KEYS_FILE_VARIABLE


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 32 random bytes, URL-safe (~43 characters)."""
    return "lg_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    customer: str
    sha256: str
    rate_per_s: float
    burst: float


@dataclass
class TokenBucket:
    """Refills ``rate`` tokens/s up to ``capacity``; a request takes one token."""

    rate: float
    capacity: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self, now: float | None = None) -> float:
        """0 when a token was taken; else the seconds until one is available (the Retry-After)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass(frozen=True)
class Admission:
    status: int  # 200 admitted, 401 unauthenticated, 429 rate limited
    customer: str | None
    retry_after_s: float = 0.0
    error: str = ""


#: Requests with a missing or unknown key that one client address may make (sustained, and at once).
UNKNOWN_KEY_RATE_PER_S = 1.0
UNKNOWN_KEY_BURST = 10.0
#: Client addresses whose failed attempts are remembered (the oldest are forgotten beyond it).
MAX_TRACKED_CLIENTS = 10_000


class KeyStore:
    """Verifies bearer keys (constant-time against stored hashes) and applies their rate limits."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = keys
        self._buckets = {k.sha256: TokenBucket(k.rate_per_s, k.burst, k.burst) for k in keys}
        self._lock = threading.Lock()
        self._unknown: dict[str, TokenBucket] = {}  # client address -> its failed-attempt bucket

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        try:
            payload = json.loads(path.read_text())
            entries = payload["keys"]
            keys = [
                ApiKey(
                    str(e["customer"]),
                    str(e["sha256"]),
                    float(e.get("rate_per_s", 10)),
                    float(e.get("burst", 20)),
                )
                for e in entries
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{API_KEYS_FILE_VARIABLE} {path}: not a valid key file ({exc})") from exc
        for key in keys:
            if key.rate_per_s <= 0 or key.burst < 1:
                raise ValueError(
                    f"{API_KEYS_FILE_VARIABLE} {path}: {key.customer}: rate_per_s > 0 and burst >= 1"
                )
        return cls(keys)

    def customer(self, authorization: str | None) -> str | None:
        """The customer of a valid bearer key (no rate limit taken), else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = hash_key(authorization.removeprefix("Bearer ").strip())
        match = next((k for k in self._keys if hmac.compare_digest(k.sha256, digest)), None)
        return None if match is None else match.customer

    def _refuse(self, client: str | None, error: str) -> Admission:
        """401 for a missing or unknown key; 429 once ``client`` has failed too often."""
        now = time.monotonic()
        with self._lock:
            bucket = self._unknown.pop(client or "?", None) or TokenBucket(
                UNKNOWN_KEY_RATE_PER_S, UNKNOWN_KEY_BURST, UNKNOWN_KEY_BURST, now
            )
            self._unknown[client or "?"] = bucket  # re-inserted: the dict keeps most recent last
            while len(self._unknown) > MAX_TRACKED_CLIENTS:
                del self._unknown[next(iter(self._unknown))]
            wait = bucket.take(now)
        if wait > 0:
            return Admission(
                429, None, retry_after_s=wait, error=f"too many requests without a valid key; {error}"
            )
        return Admission(401, None, error=error)

    def admit(self, authorization: str | None, client: str | None = None) -> Admission:
        """Check a bearer key and take one request from its rate; ``client`` (its address) rate-limits
        requests without a valid key."""
        if not authorization or not authorization.startswith("Bearer "):
            return self._refuse(client, "missing 'Authorization: Bearer <key>' header")
        digest = hash_key(authorization.removeprefix("Bearer ").strip())
        match = next((k for k in self._keys if hmac.compare_digest(k.sha256, digest)), None)
        if match is None:
            return self._refuse(client, "unknown API key")
        with self._lock:
            wait = self._buckets[match.sha256].take()
        if wait > 0:
            return Admission(
                429, match.customer, retry_after_s=wait, error=f"rate limit of {match.customer} exceeded"
            )
        return Admission(200, match.customer)


def add_key(path: Path, customer: str, rate_per_s: float, burst: float) -> str:
    """Append a new key for ``customer`` to the key file (created if missing); returns the key."""
    payload = json.loads(path.read_text()) if path.exists() else {"keys": []}
    key = new_key()
    payload["keys"].append(
        {"customer": customer, "sha256": hash_key(key), "rate_per_s": rate_per_s, "burst": burst}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # Created 0600 (not chmod-ed after the write): the hashes are never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(payload, indent=2))
    tmp.replace(path)
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: may resolve to anything
