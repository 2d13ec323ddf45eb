"""WebSocket streaming (the chapter's section 9.2.3) and the capacity view, as an ASGI app the LLM
service mounts (``bentoml.asgi_app``; BentoML 1.4 routes what its own endpoints do not match to it).

Protocol of ``/generate_ws``, one generation per connection:

1. the client sends one JSON text message, the same fields as ``POST /generate`` (``prompt`` or
   ``messages``, ``max_new_tokens``, ...); with API keys on, the handshake carries
   ``Authorization: Bearer <key>``;
2. the server answers ``{"type": "start", "request_id", "model_version"}`` once the request is admitted,
   then ``{"type": "token", "text": "..."}`` per decoded chunk (about one per token);
3. then ``{"type": "done", "request_id", "prompt_tokens", "output_tokens", "finish_reason",
   "model_version", "timings"}`` and closes with code 1000.

A refused request gets ``{"type": "error", "status": 400|401|422|429|503|500, "field", "error",
"request_id"}`` and close code 1008 (policy violation), or 1013 (try again later) for 503.
When the client goes away, generation is cancelled after the model's current step: the request log row
says ``client disconnected`` with the number of tokens the model actually produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from lockgate.bentos.accounting import (
    Accounting,
    RequestRecord,
    account_refusal,
    authorise,
    refusal_body,
)
from lockgate.bentos.protocol import GenerateInput, Prepared, Refusal, validate_input
from lockgate.bentos.stream_start import next_chunk, stream_chunks

if TYPE_CHECKING:
    from lockgate.bentos.runtime import TokenStream

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013


class StreamingBackend(Protocol):
    """What the WebSocket and /capacity need of the service (bentos/llm_service.py's LLMService)."""

    accounting: Accounting
    log_text: bool

    def capacity(self) -> dict[str, Any]: ...

    def prepare(self, record: RequestRecord, body: GenerateInput, prefix: str = "") -> Prepared | Refusal: ...

    async def start_stream(self, record: RequestRecord, prepared: Prepared) -> TokenStream | Refusal: ...


def build_app(backend: Callable[[], StreamingBackend]) -> Starlette:
    """The ASGI app the service mounts at ``/``: ``/generate_ws`` and ``/capacity``. ``backend`` gives
    the worker's service instance (it does not exist yet when the app is built)."""

    async def capacity(request: Request) -> JSONResponse:
        """GET /capacity: the KV-cache plan (bytes per token, budget, capacity) and the current queue."""
        return JSONResponse(backend().capacity())

    async def generate_ws(websocket: WebSocket) -> None:
        await _generate_ws(websocket, backend())

    return Starlette(
        routes=[
            WebSocketRoute("/generate_ws", generate_ws),
            Route("/capacity", capacity, methods=["GET"]),
        ]
    )


async def _generate_ws(websocket: WebSocket, service: StreamingBackend) -> None:
    """Stream one generation token by token; see the module docstring for the protocol."""
    accounting = service.accounting
    record = accounting.record(uuid.uuid4().hex, "generate_ws", time.perf_counter())
    record.claimed = True
    await websocket.accept()
    try:
        # The HTTP middleware does not see WebSockets: the same key check, run here.
        outcome: Prepared | Refusal | None = authorise(
            accounting.keys,
            websocket.headers.get("authorization"),
            record,
            websocket.client.host if websocket.client else None,
        )
        if outcome is None:
            outcome = await _read_request(record, websocket, service)
        stream = await service.start_stream(record, outcome) if isinstance(outcome, Prepared) else outcome
        if isinstance(stream, Refusal):
            account_refusal(stream, record)
            record.http_status = stream.status
            await _send_error(websocket, stream, record)
            return
        await _pump(websocket, stream, record, service.log_text)
    finally:
        record.clean_up()
        accounting.finish(record)


async def _read_request(
    record: RequestRecord, websocket: WebSocket, service: StreamingBackend
) -> Prepared | Refusal:
    """The first message, validated like a /generate body; a Prepared request or a Refusal."""
    try:
        text = await websocket.receive_text()
    except WebSocketDisconnect:
        return Refusal(400, "body", "client disconnected before sending a request")
    record.started = time.perf_counter()  # server time starts with the request, not the handshake
    try:
        raw = json.loads(text)
    except ValueError as exc:
        return Refusal(400, "body", f"invalid JSON: {exc}")
    body = validate_input(raw, "")
    if isinstance(body, Refusal):
        return body
    return service.prepare(record, body)


async def _send_error(websocket: WebSocket, refusal: Refusal, record: RequestRecord) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_json(
            {"type": "error", "status": refusal.status, **refusal_body(refusal, record)}
        )
        code = CLOSE_TRY_LATER if refusal.status == 503 else CLOSE_POLICY
        # A close reason may hold at most 123 bytes (RFC 6455 5.5: 125-byte control frame payload).
        await websocket.close(code=code, reason=refusal.text.encode()[:120].decode("utf-8", "ignore"))


async def _pump(websocket: WebSocket, stream: TokenStream, record: RequestRecord, log_text: bool) -> None:
    """Send chunks as they come; a watcher cancels generation as soon as the client disconnects
    (also while the model is between tokens, when no send would notice)."""
    gone = asyncio.Event()

    async def watch() -> None:
        with contextlib.suppress(Exception):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        gone.set()
        stream.cancel()

    watcher = asyncio.create_task(watch(), name="lockgate-ws-watch")
    chunks = stream_chunks(stream)
    sent = 0
    try:
        start = {"type": "start", "request_id": record.request_id, "model_version": record.model_version}
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.send_json(start)
        while not gone.is_set():
            chunk = await next_chunk(chunks)
            if chunk is None or gone.is_set():
                break
            try:
                await websocket.send_json({"type": "token", "text": chunk})
            except (WebSocketDisconnect, RuntimeError, OSError):
                gone.set()  # the send itself found the client gone
                break
            sent += 1
    except Exception as exc:
        record.fail(f"{type(exc).__name__}: {exc}")
        await _close_quietly(websocket, CLOSE_POLICY, "generation failed")
        return
    finally:
        stream.cancel()
        await asyncio.to_thread(stream.close)  # joins the thread: the token count below is final
        record.output_tokens = stream.tokens_generated
        record.prompt_tokens = stream.prompt_tokens
    if gone.is_set() or stream.generation is None:
        record.fail(f"client disconnected after {sent} chunks; generation stopped at {record.output_tokens}")
        watcher.cancel()
        return
    gen = stream.generation
    record.succeed(gen, log_text)
    record.timings.prefill = gen.first_token_s or 0.0
    record.timings.decode = max(0.0, gen.latency_s - record.timings.prefill)
    record.timings.total = time.perf_counter() - record.started
    done = {
        "type": "done",
        "request_id": record.request_id,
        "prompt_tokens": gen.prompt_tokens,
        "output_tokens": gen.output_tokens,
        "finish_reason": gen.finish_reason,
        "model_version": record.model_version,
        "timings": record.timings.as_ms(),
    }
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(done)
        await _close_quietly(websocket, CLOSE_NORMAL, "done")
    watcher.cancel()


async def _close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(code=code, reason=reason)
