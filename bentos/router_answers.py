"""What the production router (bentos/router.py) sends on and reads of a backend's answer: a JSON body,
read in full (the router re-labels it), or a stream passed through chunk by chunk as it arrives; and what
the live log records of either (tokens, time to first token, an empty answer).

No bentoml, no torch: the standard library, with aiohttp imported where a stream is read.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendAnswer:
    """A backend's answer: read in full (the router re-labels JSON bodies), or, for a stream, left open
    (``stream``: the aiohttp response whose body is passed on as it arrives)."""

    status_code: int
    content: bytes
    content_type: str
    stream: Any = None  # aiohttp.ClientResponse, open until the stream is passed on

    def json(self) -> object:
        return json.loads(self.content)


@dataclass(frozen=True)
class Routed:
    """What the router sends the client: a body, or chunks passed through as the backend sends them."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None


@dataclass
class AnswerStats:
    """What the live log records of an answer (None: the answer does not say)."""

    ttft_ms: float | None = None
    output_tokens: int | None = None
    empty: bool | None = None


def json_body(response: BackendAnswer | None) -> object:
    if response is None or "json" not in response.content_type:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def body_stats(body: object) -> AnswerStats:
    """Tokens, time to first token and emptiness of a JSON answer: lockgate's /generate shape
    (``output_tokens``, ``time_to_first_token_ms``, ``text``) or the OpenAI API's (``usage``, choices'
    ``message.content`` / ``text``)."""
    if not isinstance(body, dict):
        return AnswerStats()
    if "choices" in body:
        usage = body.get("usage") or {}
        choices = body.get("choices") or []
        texts = [(c.get("message") or {}).get("content", c.get("text")) for c in choices]
        tokens = usage.get("completion_tokens")
        return AnswerStats(
            output_tokens=int(tokens) if isinstance(tokens, int | float) else None,
            empty=not any(isinstance(t, str) and t.strip() for t in texts) if choices else None,
        )
    tokens, ttft, text = body.get("output_tokens"), body.get("time_to_first_token_ms"), body.get("text")
    return AnswerStats(
        ttft_ms=float(ttft) if isinstance(ttft, int | float) else None,
        output_tokens=int(tokens) if isinstance(tokens, int | float) else None,
        empty=(not text.strip()) if isinstance(text, str) else None,
    )


class StreamStats:
    """Reads a passed-through stream as it goes by: a text stream's emptiness, or, for server-sent
    events, whether any chunk carried text and the ``usage`` chunk's completion tokens."""

    def __init__(self, content_type: str, started: float) -> None:
        self.sse = "event-stream" in content_type
        self.started = started
        self.stats = AnswerStats(empty=True)
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        if self.stats.ttft_ms is None:
            self.stats.ttft_ms = (time.perf_counter() - self.started) * 1000
        if not self.sse:
            self.stats.empty = self.stats.empty and not chunk.strip()
            return
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        for event in events:
            for line in event.splitlines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    self._read(line[5:])

    def _read(self, data: bytes) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            return  # not JSON: nothing to count (the client gets it as it is)
        if not isinstance(chunk, dict):
            return
        tokens = (chunk.get("usage") or {}).get("completion_tokens")
        if isinstance(tokens, int):
            self.stats.output_tokens = tokens
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str) and text.strip():
                self.stats.empty = False


async def pass_through(
    response: Any, started: float, log_row: Callable[[AnswerStats, str | None], None]
) -> AsyncIterator[bytes]:
    """A backend's stream to the client chunk by chunk; the live-log row once it ended (or broke)."""
    import aiohttp

    stats = StreamStats(response.headers.get("content-type", ""), started)
    error: str | None = None
    try:
        async for chunk in response.content.iter_any():
            stats.feed(chunk)
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:  # the backend broke off mid-stream
        error = f"stream broke: {type(exc).__name__}"
        raise
    finally:  # also when the client went away: closing the backend's stream stops its generation
        if error is None and response.content.at_eof():
            response.release()  # read to its end: the connection goes back to the pool
        else:
            response.close()
        log_row(stats.stats, error)
