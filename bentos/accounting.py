"""Accounting for every request: its record, the Prometheus metrics, the request-log row and JSON log
line (:class:`Accounting`), the ASGI middleware that gives each HTTP request its record, the one API-key
check (HTTP and WebSocket alike) and the one error body every refusal is answered with.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from lockgate.bentos.auth import KeyStore
from lockgate.bentos.config import ServiceEnv
from lockgate.bentos.openai_protocol import refusal_error
from lockgate.bentos.protocol import (
    HTTP_ENDPOINTS,
    OPENAI_ENDPOINTS,
    PHASES,
    Endpoint,
    GenerateRequest,
    PhaseTimings,
    Refusal,
)
from lockgate.bentos.request_log import RequestLog, RequestRow, Status, hash_user
from lockgate.bentos.tracing import build_tracer

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation

logger = logging.getLogger("lockgate.service")
request_logger = logging.getLogger("lockgate.requests")


@dataclass
class RequestRecord:
    """What one request did; filled in by the handler, written once by :class:`Accounting`."""

    request_id: str
    endpoint: Endpoint
    started: float  # time.perf_counter()
    log_text: bool = False  # the service stores raw prompt/output text (request log)
    claimed: bool = False  # the handler saw it (else BentoML refused it before our code ran)
    status: Status | None = None
    error: str | None = None
    error_field: str | None = None
    http_status: int | None = None
    user_hash: str | None = None
    prompt_chars: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    prompt: str | None = None
    output: str | None = None
    model_version: str | None = None  # the version that served it (changes on a registry hot swap)
    customer: str | None = None  # from the API key; None when the service runs without keys
    first_token_s: float | None = None
    confidence: float | None = None
    timings: PhaseTimings = field(default_factory=PhaseTimings)
    # The HTTP request of a batch: its items are accounted one by one, so it writes no row of its own.
    itemised: bool = False
    # Run once when the request ends however it ends (KV-cache reservations): see RequestAccounting.
    cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)
    # The server's receive (the body already read): a stream waits on it for an early disconnect.
    client_receive: Callable[[], Awaitable[dict[str, Any]]] | None = field(default=None, repr=False)
    written: bool = field(default=False, repr=False)

    def clean_up(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()

    def describe(self, req: GenerateRequest, log_text: bool) -> None:
        self.claimed = True
        self.user_hash = hash_user(req.user_id)
        self.prompt_chars = len(req.prompt)
        if log_text:
            self.prompt = req.prompt

    def succeed(self, gen: Generation, log_text: bool) -> None:
        self.status, self.prompt_tokens, self.output_tokens = "ok", gen.prompt_tokens, gen.output_tokens
        self.first_token_s = gen.first_token_s
        self.confidence = gen.confidence
        if log_text:
            self.output = gen.text

    def fail(self, error: str) -> None:
        self.status, self.error = "error", error

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


class QuietRefusals(logging.Filter):
    """Drops BentoML's traceback for a request body that failed validation (a 400): the refusal is the
    client's fault and already gets its one structured line (:meth:`Accounting.finish`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ValidationError)


#: The logger BentoML reports request exceptions on (bentoml/_internal/server/http_app.py log_exception).
BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"


class ServiceMetrics:
    """The service's Prometheus metrics. Create only inside the worker (see :func:`_metrics`)."""

    def __init__(self) -> None:
        # prometheus_client picks single- or multi-process mode at import; BentoML sets
        # PROMETHEUS_MULTIPROC_DIR in the worker only after importing this module, so import it here
        # (bentoml/metrics.py explains the same). Imported earlier, /metrics would not show these.
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "llm_requests_total", "LLM requests by outcome.", ["model", "version", "status"]
        )
        self.endpoint_requests = Counter(
            "llm_endpoint_requests_total",
            "Requests by endpoint (generate, ..., v1_chat_completions, v1_models) and outcome.",
            ["endpoint", "status"],
        )
        self.duration = Histogram(
            "llm_request_duration_seconds",
            "Time to answer an LLM request (ok and error; refusals excluded).",
            ["model", "operation"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
        )
        self.tokens = Counter("llm_tokens_total", "Tokens processed, by type (prompt/completion).", ["type"])
        self.batch_size = Histogram(
            "llm_batch_size",
            "Requests decoded together: per batched generate call (micro-batcher), or in the "
            "continuous-batching engine when a request joins it.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["model"],
            buckets=latency_buckets,
        )
        self.queue_wait = Histogram(
            "llm_queue_wait_seconds", "Time a request waited for its batch to start.", buckets=latency_buckets
        )
        self.cost = Counter(
            "llm_api_cost_dollars", "Cost of served tokens at the spec's prices.", ["model", "customer"]
        )
        from prometheus_client import Gauge

        # Gauges are per process; "max" keeps one meaningful value when BentoML aggregates workers.
        self.gpu_utilization = Gauge(
            "llm_gpu_utilization_percent",
            "GPU utilisation (NVML); absent on CPU.",
            ["gpu"],
            multiprocess_mode="max",
        )
        self.memory = Gauge(
            "llm_memory_usage_bytes",
            "Memory in use, by type (cpu_rss, gpu_allocated, gpu_reserved).",
            ["type"],
            multiprocess_mode="max",
        )
        self.kv_capacity = Gauge(
            "llm_kv_cache_capacity_tokens",
            "Tokens of context the KV-cache budget holds (budget / bytes per token).",
            multiprocess_mode="max",
        )
        self.kv_bytes_per_token = Gauge(
            "llm_kv_cache_bytes_per_token",
            "layers x kv_heads x head_dim x 2 x dtype bytes of the served model.",
            multiprocess_mode="max",
        )
        self.kv_used = Gauge(
            "llm_kv_cache_reserved_tokens", "Tokens reserved by running requests.", multiprocess_mode="max"
        )
        self.queue_depth = Gauge(
            "llm_queue_depth",
            "Requests admitted but not yet generating: waiting for KV-cache room or for a batch.",
            multiprocess_mode="max",
        )
        self.response_cache = Counter(
            "llm_response_cache", "Greedy requests looked up in the response cache.", ["result"]
        )

    def count_cache(self, key: str | None, hit: object | None) -> None:
        """Count a response-cache lookup (``key`` None: the request was not cacheable, nothing counted)."""
        if key is not None:
            self.response_cache.labels("hit" if hit is not None else "miss").inc()

    def sample_resources(self) -> None:
        """Refresh the memory and GPU gauges (called per request: cheap, and /metrics stays current)."""
        import resource

        # ru_maxrss is KiB on Linux: the peak RSS, the number that decides an OOM kill.
        self.memory.labels("cpu_rss").set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            self.memory.labels("gpu_allocated").set(torch.cuda.memory_allocated())
            self.memory.labels("gpu_reserved").set(torch.cuda.memory_reserved())
            for index in range(torch.cuda.device_count()):
                with contextlib.suppress(Exception):  # NVML may be absent in a container: no gauge then
                    self.gpu_utilization.labels(str(index)).set(torch.cuda.utilization(index))


class Accounting:
    """Writes one request-log row, metric update and JSON log line per request."""

    def __init__(self, settings: ServiceEnv) -> None:
        self.settings = settings
        self.request_log = RequestLog(settings.request_log) if settings.request_log else None
        # An invalid key file fails the start-up (ValueError naming the file).
        self.keys = KeyStore.from_file(settings.api_keys_file) if settings.api_keys_file else None
        self._metrics: ServiceMetrics | None = None
        self.serving_version: str | None = None  # set once a model is loaded; follows hot swaps
        self.tracer = build_tracer(settings.config.tracing, "lockgate-llm", settings.label_name)

    def record(self, request_id: str, endpoint: Endpoint, started: float) -> RequestRecord:
        return RequestRecord(request_id, endpoint, started, log_text=self.settings.log_text)

    async def close(self) -> None:
        import asyncio

        if self.request_log is not None:
            self.request_log.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)

    @property
    def metrics(self) -> ServiceMetrics:
        if self._metrics is None:
            self._metrics = ServiceMetrics()
        return self._metrics

    def finish(self, record: RequestRecord) -> None:
        """Account for ``record`` once. Synchronous on purpose: a WAL commit with synchronous=NORMAL
        does no fsync (well under 1 ms), and it must be done before the response's last byte goes
        out, also when the request is being cancelled (an ``await`` there could be cancelled too)."""
        if record.written:
            return
        record.written = True
        record.clean_up()
        if record.itemised:
            return
        s = self.settings
        status: Status = record.status or "error"
        version = record.model_version or self.serving_version or s.label_version
        model_name = s.label_name
        latency_ms = record.latency_ms()
        if self.request_log is not None:
            self.request_log.append(
                RequestRow(
                    # Completion time, not arrival: rows then commit in ts order, so a reader polling
                    # with since=<last ts seen> misses nothing.
                    ts=time.time(),
                    request_id=record.request_id,
                    service_role=s.role,
                    model_name=model_name,
                    model_version=version,
                    endpoint=record.endpoint,
                    user_hash=record.user_hash,
                    prompt_chars=record.prompt_chars,
                    prompt_tokens=record.prompt_tokens,
                    output_tokens=record.output_tokens,
                    latency_ms=latency_ms,
                    status=status,
                    error=record.error,
                    prompt=record.prompt,
                    output=record.output,
                    confidence=record.confidence,
                )
            )
        m = self.metrics
        m.requests.labels(model_name, version, status).inc()
        m.endpoint_requests.labels(record.endpoint, status).inc()
        if status != "rejected":  # refusals take microseconds and would drag latency quantiles down
            m.duration.labels(model_name, record.endpoint).observe(latency_ms / 1000.0)
        if status == "ok":
            m.tokens.labels("prompt").inc(record.prompt_tokens or 0)
            m.tokens.labels("completion").inc(record.output_tokens or 0)
            prices = s.config.pricing
            cost = (record.prompt_tokens or 0) * prices.prompt_per_1k_tokens / 1000 + (
                record.output_tokens or 0
            ) * prices.completion_per_1k_tokens / 1000
            m.cost.labels(model_name, record.customer or "anonymous").inc(cost)
            if record.first_token_s is not None:
                m.ttft.labels(model_name).observe(record.first_token_s)
        m.sample_resources()
        line = {
            "event": "llm_request",
            "request_id": record.request_id,
            "endpoint": record.endpoint,
            "model": model_name,
            "model_version": version,
            "role": s.role,
            "status": status,
            "http_status": record.http_status,
            "latency_ms": round(latency_ms, 2),
            "prompt_tokens": record.prompt_tokens,
            "output_tokens": record.output_tokens,
            "error": record.error,
        }
        request_logger.info(json.dumps(line))
        if self.tracer is not None and record.claimed:
            self._trace(record, version, status, latency_ms)

    def _trace(self, record: RequestRecord, version: str, status: Status, latency_ms: float) -> None:
        t = record.timings
        phases = [(name, getattr(t, name)) for name in PHASES if name != "total"]
        attributes: dict[str, str | int | float | bool] = {
            "lockgate.request_id": record.request_id,
            "lockgate.endpoint": record.endpoint,
            "lockgate.model": self.settings.label_name,
            "lockgate.model_version": version,
            "lockgate.role": self.settings.role,
            "lockgate.status": status,
            "gen_ai.usage.input_tokens": record.prompt_tokens or 0,
            "gen_ai.usage.output_tokens": record.output_tokens or 0,
        }
        if record.http_status is not None:
            attributes["http.response.status_code"] = record.http_status
        self.tracer.record(latency_ms / 1000.0, phases, attributes, failed=status == "error")  # type: ignore[union-attr]


# -- the one error body, the one key check ---------------------------------------------------------


def error_body(
    request_id: str, message: str, field: str | None = None, retry_after_s: float | None = None
) -> dict[str, Any]:
    """The JSON every refusal and failure is answered with (HTTP, batch item, WebSocket message)."""
    body: dict[str, Any] = {"error": message, "request_id": request_id}
    if field is not None:
        body["field"] = field
    if retry_after_s is not None:
        body["retry_after_s"] = retry_after_s
    return body


def retry_after_header(retry_after_s: float | None) -> dict[str, str]:
    if retry_after_s is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


def refusal_body(refusal: Refusal, record: RequestRecord) -> dict[str, Any]:
    return error_body(record.request_id, refusal.text, refusal.field, refusal.retry_after_s)


def account_refusal(refusal: Refusal, record: RequestRecord) -> None:
    """Client faults and backpressure are refusals; not ready and failures count as errors."""
    if refusal.request is not None:
        record.describe(refusal.request, log_text=record.log_text)
    if refusal.is_error:
        record.fail(refusal.text)
    else:
        record.status, record.error, record.error_field = "rejected", refusal.text, refusal.field


def refusal_response(
    refusal: Refusal, record: RequestRecord, headers: dict[str, str] | None = None
) -> JSONResponse:
    account_refusal(refusal, record)
    return JSONResponse(
        refusal_body(refusal, record),
        status_code=refusal.status,
        headers={**retry_after_header(refusal.retry_after_s), **(headers or {})},
    )


def failure(record: RequestRecord, exc: Exception) -> Refusal:
    """A generation that raised: logged with its traceback, answered 500."""
    logger.error("request %s failed", record.request_id, exc_info=exc)
    return Refusal(500, None, f"generation failed: {type(exc).__name__}: {exc}")


def authorise(
    keys: KeyStore | None, authorization: str | None, record: RequestRecord, client: str | None = None
) -> Refusal | None:
    """401 without a valid key, 429 over the key's rate or when ``client`` (an address) sent too many
    requests without a valid key (with Retry-After); None when admitted or when the service runs without
    keys. Times itself into ``record.timings.auth``."""
    if keys is None:
        return None
    started = time.perf_counter()
    admission = keys.admit(authorization, client)
    record.customer = admission.customer
    record.timings.auth = time.perf_counter() - started
    if admission.status == 200:
        return None
    retry = admission.retry_after_s if admission.status == 429 else None
    return Refusal(admission.status, "authorization", admission.error or "refused", retry, prefixed=False)


_CURRENT_RECORD: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "lockgate_request_record", default=None
)


def current_record(endpoint: Endpoint, log_text: bool) -> RequestRecord:
    """The middleware's record of this request (a fresh one when called without the middleware)."""
    record = _CURRENT_RECORD.get()
    if record is None:
        record = RequestRecord(uuid.uuid4().hex, endpoint, time.perf_counter(), log_text=log_text)
    return record


class RequestAccounting:
    """ASGI middleware around the HTTP generation endpoints: gives each request an id and accounts for it.

    It also sees requests BentoML refuses before our handler runs (malformed JSON, missing or
    wrong-typed fields: 400 with pydantic's ``detail``); for those it adds ``field`` to the body, so
    every refusal names its field the same way as our own 422s.
    """

    def __init__(self, app: Any, accounting: Callable[[], Accounting]) -> None:
        self.app = app
        # Resolved per request: the service instance (which owns the accounting) is created in the
        # worker after BentoML has built this middleware.
        self.accounting = accounting

    async def _metrics(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """/metrics: with keys on, a caller without a valid key gets it without the per-customer series
        (who the customers are and what they spend is theirs and the operator's, not every scraper's)."""
        keys = self.accounting().keys
        auth = dict(scope.get("headers") or []).get(b"authorization")
        if keys is None or keys.customer(auth.decode("latin-1") if auth else None) is not None:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def redact(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            kept = b"".join(ln for ln in bytes(body).splitlines(keepends=True) if b'customer="' not in ln)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(kept)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": kept})

        await self.app(scope, receive, redact)

    async def _refuse_unauthorised(
        self, accounting: Accounting, record: RequestRecord, scope: dict[str, Any], receive: Any, send: Any
    ) -> bool:
        """401 without a valid key, 429 over the key's rate (with Retry-After); True when refused."""
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization")
        client = (scope.get("client") or ("?", 0))[0]
        refusal = authorise(accounting.keys, auth.decode("latin-1") if auth else None, record, client)
        if refusal is None:
            return False
        record.claimed, record.http_status = True, refusal.status
        response = refusal_response(refusal, record, {"x-request-id": record.request_id})
        if record.endpoint in OPENAI_ENDPOINTS:  # the OpenAI SDKs read their own error shape
            response = JSONResponse(
                refusal_error(refusal, record.request_id),
                status_code=refusal.status,
                headers={**retry_after_header(refusal.retry_after_s), "x-request-id": record.request_id},
            )
        accounting.finish(record)
        await response(scope, receive, send)
        return True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            await self._metrics(scope, receive, send)
            return
        endpoint = _endpoint(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        accounting = self.accounting()
        record = accounting.record(uuid.uuid4().hex, endpoint, time.perf_counter())
        refused = await self._refuse_unauthorised(accounting, record, scope, receive, send)
        record.timings.auth = time.perf_counter() - record.started
        if refused:
            return
        # A context variable, not a `ctx: bentoml.Context` parameter: with ctx, BentoML overwrites the
        # status code of a returned Response with ctx.response.status_code (200), losing our 422s.
        record.client_receive = receive
        token = _CURRENT_RECORD.set(record)
        held: dict[str, Any] = {}  # response start of an unclaimed error, held to rewrite its body
        body = bytearray()

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.http_status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", record.request_id.encode()),
                ]
                if not record.claimed and message["status"] >= 400:
                    held.update(message)
                    return
                await send(message)
            elif message["type"] == "http.response.body" and held:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    start, new_body = _rewrite_refusal(record, held, bytes(body))
                    accounting.finish(record)
                    await send(start)
                    await send({"type": "http.response.body", "body": new_body})
            else:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    if record.status is None:  # a claimed response that did not say how it went
                        record.fail(f"HTTP {record.http_status} without an outcome")
                    accounting.finish(record)  # before the last byte: acknowledged => logged
                await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _CURRENT_RECORD.reset(token)
            record.clean_up()  # a stream whose body never ran still gives its KV reservation back
            if not record.written:
                if record.status in (None, "ok"):
                    record.fail("response not completed (client disconnected, timeout or stream error)")
                accounting.finish(record)


def _endpoint(path: str) -> Endpoint | None:
    """The accounted endpoint a request path ends with (BentoML may mount the service under a prefix)."""
    for suffix, endpoint in HTTP_ENDPOINTS.items():
        if path.endswith(suffix):
            return endpoint
    return None


def _rewrite_refusal(
    record: RequestRecord, start: dict[str, Any], body: bytes
) -> tuple[dict[str, Any], bytes]:
    """Account for a response BentoML produced without our handler, adding ``field`` to its body."""
    status = start["status"]
    record.status = "rejected" if status < 500 else "error"
    try:
        payload = json.loads(body)
    except ValueError:
        record.error = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
        return start, body
    details = payload.get("detail") if isinstance(payload, dict) else None
    if not isinstance(details, list) or not details:
        record.error = f"HTTP {status}: {payload}"
        return start, body
    first = details[0]
    loc = [str(part) for part in first.get("loc", [])]
    field_name = ".".join(loc) if loc else "body"  # json_invalid has no loc: the body itself is bad
    message = f"{field_name}: {first.get('msg', 'invalid')}"
    record.error, record.error_field = message, field_name
    new_body = json.dumps({**payload, **error_body(record.request_id, message, field_name)})
    encoded = new_body.encode()
    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(encoded)).encode()))
    return {**start, "headers": headers}, encoded
