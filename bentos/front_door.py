"""The front door: what every POST must pass before any route (BentoML's, /v1, the mounted app) reads it.

An ASGI middleware, so it holds for every route, present and future:

- the body is capped (``limits.max_body_bytes``): a larger ``Content-Length`` gets 413 before a byte is
  read, and a chunked body is counted as it arrives and cut off at the cap (413) — never parsed;
- a body must be JSON (``Content-Type: application/json``): anything else gets 415 naming the type;
- routes with a known body schema (``/generate``, ``/generate_stream``: :data:`STRICT_BODIES`) refuse
  fields they do not know with 400 naming the field (BentoML's signature model ignores them silently);
- ``limits.concurrency`` requests in flight at most: one more gets 429 with ``Retry-After``.

Its refusals use the shape of the route: ``/v1/...`` an OpenAI error object, the others the pydantic
``detail`` list that :class:`~lockgate.bentos.accounting.RequestAccounting` (outside this middleware)
rewrites into the service's error body, accounts and logs as one structured line.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lockgate.bentos.config import LimitsConfig

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: A body bigger than the cap: the reason and its status.
TOO_LARGE = 413
#: Retry-After of a request over the concurrency limit: requests take ~0.1-10 s here.
BUSY_RETRY_AFTER_S = 1


class Refused(Exception):
    """A request the front door does not let through: status, the field at fault, the message."""

    def __init__(self, status: int, field: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message
        self.headers = dict(headers or {})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def check_content(scope: Scope, max_body_bytes: int) -> None:
    """The checks that need only the headers: content type, declared length."""
    content_type = _header(scope, b"content-type")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = content_type if content_type is not None else "none"
        raise Refused(415, "content-type", f"must be application/json, got {shown!r}")
    length = _header(scope, b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise Refused(400, "content-length", f"is not a number: {length!r}") from None
        if declared > max_body_bytes:
            raise Refused(TOO_LARGE, "body", f"is {declared} bytes; at most {max_body_bytes} are accepted")


async def read_capped(receive: Receive, max_body_bytes: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes the cap (a chunked body has no length)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "body", "client disconnected before the body was complete")
        body.extend(message.get("body", b""))
        if len(body) > max_body_bytes:
            raise Refused(TOO_LARGE, "body", f"is over {max_body_bytes} bytes, the most accepted")
        if not message.get("more_body", False):
            return bytes(body)


def check_fields(body: bytes, allowed: frozenset[str]) -> None:
    """400 naming the first field the route does not know (malformed JSON is left to the route)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return
    if not isinstance(payload, dict):
        return
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise Refused(400, unknown[0], f"unknown field; accepted fields are {', '.join(sorted(allowed))}")


def refusal_body(path: str, refused: Refused) -> dict[str, Any]:
    if path.startswith("/v1/"):
        kinds = {413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_exceeded"}
        return {
            "error": {
                "message": f"{refused.field}: {refused.message}",
                "type": "invalid_request_error" if refused.status != 429 else "rate_limit_error",
                "param": refused.field,
                "code": kinds.get(refused.status, "invalid_request_error"),
            }
        }
    # The pydantic shape BentoML refuses with: RequestAccounting names the field from ``loc``.
    return {
        "error": f"{refused.field}: {refused.message}",
        "detail": [{"loc": [refused.field], "msg": refused.message, "type": "front_door"}],
    }


async def send_refusal(send: Send, path: str, refused: Refused) -> None:
    encoded = json.dumps(refusal_body(path, refused)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(encoded)).encode()),
        # The body may be unread: the connection cannot be reused for the next request.
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in refused.headers.items()),
    ]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": encoded})


class FrontDoor:
    """ASGI middleware applying the checks of the module docstring to every HTTP POST."""

    def __init__(
        self,
        app: Any,
        limits: Callable[[], LimitsConfig],
        strict_bodies: Mapping[str, frozenset[str]],
    ) -> None:
        self.app = app
        self.limits = limits
        self.strict_bodies = strict_bodies
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        limits = self.limits()
        path = scope.get("path", "")
        if self.in_flight >= limits.concurrency:
            # Before reading anything: a refusal over the limit costs the server nothing.
            message = f"{limits.concurrency} requests in flight, the most this worker takes; retry later"
            retry = {"Retry-After": str(BUSY_RETRY_AFTER_S)}
            await send_refusal(send, path, Refused(429, "concurrency", message, retry))
            return
        self.in_flight += 1
        try:
            try:
                check_content(scope, limits.max_body_bytes)
                body = await read_capped(receive, limits.max_body_bytes)
                allowed = self.strict_bodies.get(path)
                if allowed is not None:
                    check_fields(body, allowed)
            except Refused as refused:
                await send_refusal(send, path, refused)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read body once, then waits on the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
