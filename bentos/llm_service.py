"""The LLM service: ``bentoml serve lockgate.bentos.llm_service:LLMService``.

Configured only through its environment, read once at import into a :class:`ServiceEnv`
(bentos/config.py names every variable: model URI and labels, role, request log, the ``package:``
config as JSON, API keys, feature flags, registry polling). BentoML needs the resources and traffic
limits when the class is decorated; everything else is built in the worker, in ``__init__``.

Endpoints: ``POST /generate`` (JSON; ``prompt`` or chat ``messages``), ``POST /generate_batch`` (a list
of /generate bodies, answered in order, per-item errors), ``POST /generate_stream`` (text chunks),
``/generate_ws`` (WebSocket, token messages; bentos/websocket.py), ``GET /capacity`` (KV-cache plan and
queue), plus BentoML's ``/readyz`` (200 only once the model is loaded and warmed up), ``/livez`` and
``/metrics``. Every request — answered, refused or failed — gets one request-log row, one
``llm_requests_total`` increment and one JSON log line (bentos/accounting.py; a batch: one per item).

The request path: bentos/protocol.py checks a request (:func:`prepare`), bentos/model_host.py reserves
its KV-cache room and runs it on the engine or the micro-batcher (bentos/batching.py); this module
only wires the endpoints, the response cache and the feature flags together. Responses carry their
server time per phase (``timings`` in the body, ``Server-Timing`` header) for ``lockgate profile``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
import bentoml
from starlette.responses import JSONResponse, StreamingResponse

from lockgate.bentos.accounting import (
    BENTOML_REQUEST_LOGGER,
    Accounting,
    QuietRefusals,
    RequestAccounting,
    RequestRecord,
    account_refusal,
    current_record,
    failure,
    refusal_body,
    refusal_response,
    request_logger,
)
from lockgate.bentos.chat import ChatMessage
from lockgate.bentos.config import ServiceConfig, ServiceEnv
from lockgate.bentos.feature_flags import FeatureFlags, apply_service_flags
from lockgate.bentos.front_door import FrontDoor
from lockgate.bentos.model_host import ModelHost, Served
from lockgate.bentos.openai_routes import build_app as build_openai_app
from lockgate.bentos.protocol import (
    STRICT_BODIES,
    GenerateInput,
    GenerateRequest,
    GenerateResponse,
    Prepared,
    Refusal,
    prepare,
    validate_input,
)
from lockgate.bentos.response_cache import CachedAnswer, build_cache, cache_key
from lockgate.bentos.service_info import SERVICE_TITLE, lockgate_version, service_description
from lockgate.bentos.stream_start import (
    ClientGone,
    client_gone_response,
    first_chunk,
    next_chunk,
    size_stream_readers,
    stream_chunks,
)
from lockgate.bentos.websocket import build_app as build_websocket_app

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation, TokenStream

logger = logging.getLogger("lockgate.service")

#: Read at import: BentoML takes resources and traffic limits at decoration time.
ENV = ServiceEnv.from_env(os.environ)


def _resources(config: ServiceConfig) -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu": config.resources.cpu, "memory": config.resources.memory}
    if config.resources.gpu > 0:
        resources["gpu"] = config.resources.gpu
    return resources


def _enable_loggers() -> None:
    """BentoML's worker runs logging.config.dictConfig after importing this module, which disables
    every logger that existed then (disable_existing_loggers) and sets the root level to WARNING.
    Re-enable ours; request lines go to stdout as bare JSON, one per line."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("lockgate", "bentos"):
            logging.getLogger(name).disabled = False
    for name in ("lockgate", "bentos"):
        logging.getLogger(name).setLevel(logging.INFO)
    bentoml_requests = logging.getLogger(BENTOML_REQUEST_LOGGER)
    if not any(isinstance(f, QuietRefusals) for f in bentoml_requests.filters):
        bentoml_requests.addFilter(QuietRefusals())
    if not request_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_logger.addHandler(handler)
        request_logger.propagate = False


def _cached_answer(gen: Generation) -> CachedAnswer:
    return CachedAnswer(gen.text, gen.prompt_tokens, gen.output_tokens, gen.finish_reason, gen.confidence)


T = TypeVar("T")


class DescribedService(bentoml.Service[T]):
    """BentoML's service with lockgate's OpenAPI info: BentoML fills it with a generic README and the
    bento tag (``None`` when served from source); reviewers need what is served and by which version."""

    @property
    def openapi_spec(self) -> Any:
        spec = super().openapi_spec
        labels = self.bento.info.labels if self.bento is not None else None
        info = attrs.evolve(
            spec.info,
            title=f"{SERVICE_TITLE} ({self.name})",
            description=service_description(ENV),
            version=lockgate_version(labels),
        )
        return attrs.evolve(spec, info=info)


@bentoml.service(
    service_class=DescribedService,
    resources=_resources(ENV.config),
    traffic={"timeout": ENV.config.limits.timeout_s, "concurrency": ENV.config.limits.concurrency},
    workers=1,
)
class LLMService:
    """Serves one model version; see the module docstring for configuration and endpoints."""

    def __init__(self) -> None:
        _enable_loggers()
        self.settings = ENV
        self.log_text = ENV.log_text
        size_stream_readers(ENV.config.limits.concurrency)
        self.accounting = Accounting(ENV)
        _ = self.accounting.metrics  # register the metrics now, so /metrics lists them before traffic
        self.host = ModelHost(ENV, lambda: self.accounting.metrics)
        self.host.on_version = self._on_version
        self.response_cache = build_cache(ENV.config.response_cache)
        # An invalid flag file fails the start-up; later edits apply live.
        self.flags = FeatureFlags(ENV.feature_flags_file) if ENV.feature_flags_file else None

    def _on_version(self, version: str) -> None:
        self.accounting.serving_version = version

    @bentoml.on_startup
    async def start_loading(self) -> None:
        self.host.start()

    @bentoml.on_shutdown
    async def shut_down(self) -> None:
        await self.host.stop()
        await self.accounting.close()

    async def __is_ready__(self) -> bool:
        return self.host.is_ready

    async def __is_alive__(self) -> bool:
        return self.host.is_alive

    def capacity(self) -> dict[str, Any]:
        return self.host.capacity()

    # -- the request path --------------------------------------------------------------------------------

    def _apply_flags(self, req: GenerateRequest) -> tuple[GenerateRequest, dict[str, str]]:
        """The request as the feature flags on for its user make it, and the header naming those flags."""
        if self.flags is None:
            return req, {}
        policy = apply_service_flags(self.flags.flags(), req.user_id, req.max_new_tokens, req.stop)
        flagged = replace(req, max_new_tokens=policy.max_new_tokens, stop=policy.stop)
        return flagged, {"x-lockgate-flags": ",".join(policy.applied)}

    def prepare(self, record: RequestRecord, body: GenerateInput, prefix: str = "") -> Prepared | Refusal:
        """Check one request up to the point where it may wait for the model (bentos/protocol.py)."""
        record.claimed = True
        started = time.perf_counter()
        view = self.host.view()
        outcome = prepare(
            body, self.settings.config, view, self.host.not_ready_reason, self._apply_flags, prefix
        )
        if isinstance(outcome, Prepared):
            record.describe(outcome.request, self.log_text)
            record.timings.tokenize = time.perf_counter() - started
        return outcome

    async def start_stream(self, record: RequestRecord, prepared: Prepared) -> TokenStream | Refusal:
        return await self.host.start_stream(record, prepared)

    async def run_unary(self, record: RequestRecord, prepared: Prepared) -> dict[str, Any] | Refusal:
        """Answer from the response cache, or reserve, batch, generate; the response body, or why not."""
        served = self.host.served
        assert served is not None
        key = self._cache_key(served, prepared.request)
        cache = self.response_cache
        hit = await asyncio.to_thread(cache.get, key) if key is not None and cache is not None else None
        self.accounting.metrics.count_cache(key, hit)
        if hit is not None:
            from lockgate.bentos.runtime import Generation

            record.model_version = served.version
            gen = Generation(
                hit.text, hit.prompt_tokens, hit.output_tokens, 0.0, None, hit.finish_reason, hit.confidence
            )
        else:
            outcome = await self._generate_reserved(record, prepared)
            if isinstance(outcome, Refusal):
                return outcome
            served, gen = outcome
            key = self._cache_key(served, prepared.request)  # the version may have changed meanwhile
            if key is not None and cache is not None:
                await asyncio.to_thread(cache.put, key, _cached_answer(gen))
        record.succeed(gen, self.log_text)
        record.timings.record_generation(gen)
        record.timings.total = time.perf_counter() - record.started
        return GenerateResponse(
            text=gen.text,
            prompt_tokens=gen.prompt_tokens,
            output_tokens=gen.output_tokens,
            latency_ms=round(record.latency_ms(), 3),
            time_to_first_token_ms=None if gen.first_token_s is None else round(gen.first_token_s * 1000, 3),
            model_version=served.version,
            request_id=record.request_id,
            finish_reason=gen.finish_reason,
            confidence=None if gen.confidence is None else round(gen.confidence, 6),
            timings=record.timings.as_ms(),
            cached=hit is not None,
        ).model_dump()

    async def _generate_reserved(
        self, record: RequestRecord, prepared: Prepared
    ) -> tuple[Served, Generation] | Refusal:
        """Reserve KV-cache room, then generate on the version served once the room is there."""
        refused = await self.host.reserve(record, prepared.reserve_tokens)
        if refused is not None:
            return refused
        try:
            # After the wait: a hot swap meanwhile serves this on the new version (the host hands over).
            record.model_version = self.host.served.version if self.host.served else None
            try:
                served, gen = await self.host.generate(prepared.request, record.timings)
            except Exception as exc:
                return failure(record, exc)
            record.model_version = served.version
            return served, gen
        finally:
            record.clean_up()  # the cache room is free once generation is done

    def _cache_key(self, served: Served, req: GenerateRequest) -> str | None:
        """The response-cache key of a deterministic (greedy) request; None when it is not cacheable."""
        if self.response_cache is None or req.temperature != 0.0 or req.penalties:
            return None
        calibration = served.calibration_temperature  # the engine's: a recalibration re-keys answers
        return cache_key(served.version, calibration, req.prompt, req.max_new_tokens, req.stop)

    # -- endpoints ---------------------------------------------------------------------------------------

    @bentoml.api
    async def generate(
        self,
        prompt: str | None = None,
        messages: list[ChatMessage] | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        user_id: str | None = None,
    ) -> GenerateResponse:
        """Continue ``prompt`` (or answer chat ``messages``); concurrent calls are micro-batched.

        400 names a missing/conflicting field, 422 the field over a limit (KV-cache capacity included),
        503 with Retry-After when the queue for KV-cache room is full. The body's ``timings`` and the
        ``Server-Timing`` header give the time per phase (``lockgate profile`` reads them)."""
        record = current_record("generate", self.log_text)
        body = GenerateInput.model_construct(
            prompt=prompt, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, user_id=user_id,
        )  # fmt: skip
        prepared = self.prepare(record, body)
        if isinstance(prepared, Refusal):
            return refusal_response(prepared, record)  # type: ignore[return-value]  # BentoML passes Responses through
        outcome = await self.run_unary(record, prepared)
        if isinstance(outcome, Refusal):
            return refusal_response(outcome, record)  # type: ignore[return-value]
        headers = {**prepared.headers, "Server-Timing": record.timings.server_timing()}
        return JSONResponse(outcome, headers=headers)  # type: ignore[return-value]

    @bentoml.api
    async def generate_batch(self, requests: list[Any]) -> dict[str, Any]:
        """Run a list of /generate bodies through the same batcher; answers in order.

        Each item is validated on its own: a bad item gets its own error (``status_code`` 400/422/503/500
        and ``field`` as ``requests.<i>.<field>``) and the others still run. Items are accounted one by
        one (request-log rows ``<batch request_id>-<i>``, metrics, cost)."""
        outer = current_record("generate_batch", self.log_text)
        outer.claimed = True
        limit = self.settings.config.limits.max_batch_items
        if not requests or len(requests) > limit:
            message = f"must hold 1 to {limit} requests, got {len(requests)}"
            return refusal_response(Refusal(422, "requests", message), outer)  # type: ignore[return-value]
        outer.itemised = True
        results = await asyncio.gather(*(self._batch_item(outer, i, item) for i, item in enumerate(requests)))
        outer.status = "ok"
        return JSONResponse({"request_id": outer.request_id, "results": results})  # type: ignore[return-value]

    async def _batch_item(self, outer: RequestRecord, index: int, raw: Any) -> dict[str, Any]:
        record = self.accounting.record(f"{outer.request_id}-{index}", "generate_batch", outer.started)
        record.customer = outer.customer
        record.timings.auth = outer.timings.auth
        prefix = f"requests.{index}"
        try:
            body = validate_input(raw, prefix)
            prepared = body if isinstance(body, Refusal) else self.prepare(record, body, prefix)
            outcome = prepared if isinstance(prepared, Refusal) else await self.run_unary(record, prepared)
            if isinstance(outcome, Refusal):
                account_refusal(outcome, record)
                record.http_status = outcome.status
                return {"index": index, "status_code": outcome.status, **refusal_body(outcome, record)}
            record.http_status = 200
            return {"index": index, "status_code": 200, **outcome}
        finally:
            self.accounting.finish(record)

    @bentoml.api
    async def generate_stream(
        self,
        prompt: str | None = None,
        messages: list[ChatMessage] | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        user_id: str | None = None,
    ) -> str:
        """Stream the continuation of ``prompt`` as text/plain chunks (one per decoded token or so).

        Returns a starlette Response (BentoML passes it through) instead of being an async generator,
        so that refusals get a real 422 and a failure before the first token a real 500. A failure
        after the first chunk aborts the connection (the client sees an incomplete body), rather than
        ending the stream cleanly the way BentoML's own streaming does (io_models.py swallows it).
        """
        record = current_record("generate_stream", self.log_text)
        body = GenerateInput.model_construct(
            prompt=prompt, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, user_id=user_id,
        )  # fmt: skip
        prepared = self.prepare(record, body)
        if isinstance(prepared, Refusal):
            return refusal_response(prepared, record)  # type: ignore[return-value]
        started = await self.start_stream(record, prepared)
        if isinstance(started, Refusal):
            return refusal_response(started, record)  # type: ignore[return-value]
        stream = started
        chunks = stream_chunks(stream)
        try:
            first = await first_chunk(chunks, stream.cancel, record.client_receive)
        except ClientGone as gone:
            record.fail(str(gone))
            return client_gone_response()  # type: ignore[return-value]
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, Exception):
                return refusal_response(failure(record, exc), record)  # type: ignore[return-value]
            raise
        body_iter = _stream_body(stream, chunks, first, record, self.log_text)
        media = "text/plain; charset=utf-8"
        return StreamingResponse(body_iter, media_type=media, headers=prepared.headers)  # type: ignore[return-value]


async def _stream_body(
    stream: TokenStream, chunks: AsyncIterator[str], first: str | None, record: RequestRecord, log_text: bool
) -> AsyncIterator[str]:
    try:
        chunk = first
        while chunk is not None:
            yield chunk
            chunk = await next_chunk(chunks)
    except Exception as exc:
        logger.exception("stream %s failed after it started", record.request_id)
        record.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        # Non-blocking: a reader that went away must not keep the model busy (and locked).
        stream.cancel()
    if stream.generation is not None:
        record.succeed(stream.generation, log_text)


def _current_service() -> LLMService:
    """The worker's service instance (the middleware and the mounted app are built before it exists)."""
    return cast(LLMService, bentoml.get_current_service())


def _current_accounting() -> Accounting:
    return _current_service().accounting


LLMService.add_asgi_middleware(RequestAccounting, accounting=_current_accounting)
# /v1/chat/completions, /v1/completions, /v1/models (bentos/openai_routes.py). Mounted before "/":
# Starlette tries mounts in order, and "/" would match /v1/... too.
LLMService.mount_asgi_app(build_openai_app(_current_service), path="/v1")
# Inside the accounting (added after it): body cap, JSON only, unknown fields, concurrency, every route.
LLMService.add_asgi_middleware(FrontDoor, limits=lambda: ENV.config.limits, strict_bodies=STRICT_BODIES)
# /generate_ws and /capacity: a Starlette app BentoML routes to when none of its own routes match.
LLMService.mount_asgi_app(build_websocket_app(_current_service), path="/")

__all__ = ["ENV", "LLMService"]
