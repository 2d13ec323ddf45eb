"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``: the OpenAI API on the LLM service.

An ASGI app the service mounts at ``/v1``. Every request goes the way of ``/generate``: the accounting
middleware (API key, request record, one request-log row, metrics by endpoint), :func:`prepare` (limits,
KV-cache fit, feature flags), KV-cache admission, the engine or micro-batcher, the response cache. The
wire format is bentos/openai_protocol.py's; log-probabilities come from bentos/scoring.py (one forward
pass) and ``response_format`` from bentos/constrained.py (xgrammar).

``n`` choices and several completion prompts run one after the other under the request's one record
(each reserves and frees its own KV-cache room); their tokens are summed in the record and ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lockgate.bentos import openai_protocol as oai
from lockgate.bentos.accounting import (
    RequestRecord,
    account_refusal,
    current_record,
    failure,
    retry_after_header,
)
from lockgate.bentos.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from lockgate.bentos.protocol import GenerateInput, Prepared, Refusal
from lockgate.bentos.stream_start import (
    ClientGone,
    client_gone_response,
    first_chunk,
    next_chunk,
    stream_chunks,
)

if TYPE_CHECKING:
    from lockgate.bentos.accounting import Accounting
    from lockgate.bentos.config import ServiceEnv
    from lockgate.bentos.model_host import ModelHost
    from lockgate.bentos.runtime import Generation, TokenStream


class OpenAIBackend(Protocol):
    """What the /v1 routes need of the service (bentos/llm_service.py's LLMService)."""

    accounting: Accounting
    settings: ServiceEnv
    host: ModelHost
    log_text: bool

    def prepare(self, record: RequestRecord, body: GenerateInput, prefix: str = "") -> Prepared | Refusal: ...

    async def run_unary(self, record: RequestRecord, prepared: Prepared) -> dict[str, Any] | Refusal: ...

    async def start_stream(self, record: RequestRecord, prepared: Prepared) -> TokenStream | Refusal: ...


@dataclass
class Choice:
    text: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    prompt: str  # as the model saw it (chat rendered)


def error_response(refusal: Refusal, record: RequestRecord) -> JSONResponse:
    """An OpenAI error object with the refusal's status (Retry-After on 429/503)."""
    account_refusal(refusal, record)
    body = oai.refusal_error(refusal, record.request_id)
    return JSONResponse(body, status_code=refusal.status, headers=retry_after_header(refusal.retry_after_s))


def build_app(backend: Callable[[], OpenAIBackend]) -> Starlette:
    async def chat(request: Request) -> Response:
        return await _handle(backend(), request, "v1_chat_completions", ChatCompletionRequest)

    async def completions(request: Request) -> Response:
        return await _handle(backend(), request, "v1_completions", CompletionRequest)

    async def models(request: Request) -> Response:
        service = backend()
        record = current_record("v1_models", service.log_text)
        record.claimed = True
        record.status = "ok"
        return JSONResponse(oai.models_list(_served_models(service)))

    return Starlette(
        routes=[
            Route("/chat/completions", chat, methods=["POST"]),
            Route("/completions", completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
        ]
    )


def _served_models(service: OpenAIBackend) -> list[oai.ServedModel]:
    """The version this service serves: its model name, with role (stable/canary) and version."""
    env = service.settings
    served = service.host.served
    version = served.version if served is not None else env.label_version
    return [oai.served_model(env.label_name, env.role, version, service.host.is_ready)]


def _model_refusal(service: OpenAIBackend, model: str) -> Refusal | None:
    served = _served_models(service)
    names = {alias for name, _owner, meta in served for alias in (name, f"{name}:{meta['version']}")}
    if model in names:
        return None
    return Refusal(404, "model", f"model {model!r} is not served here; GET /v1/models lists {sorted(names)}")


async def _handle(
    service: OpenAIBackend,
    request: Request,
    endpoint: str,
    kind: type[ChatCompletionRequest] | type[CompletionRequest],
) -> Response:
    record = current_record(endpoint, service.log_text)  # type: ignore[arg-type]
    record.claimed = True
    try:
        raw = json.loads(await request.body())
    except ValueError as exc:
        return error_response(Refusal(400, "body", f"is not valid JSON: {exc}"), record)
    parsed = oai.parse(kind, raw)
    if isinstance(parsed, Refusal):
        return error_response(parsed, record)
    req: OpenAIRequest = parsed  # type: ignore[assignment]
    refused = oai.unsupported(req) or _model_refusal(service, req.model)
    if refused is not None:
        return error_response(refused, record)
    prompts = _prompts(service, req)
    if isinstance(prompts, Refusal):
        return error_response(prompts, record)
    if req.stream and not oai.streams_whole_answers(req):
        return await _stream(service, record, req, prompts[0][0])
    return await _unary(service, record, req, prompts)


def _with_penalties(prepared: Prepared, req: OpenAIRequest) -> Prepared:
    """The checked request with the OpenAI penalties it sets (GenerateInput, /generate's body, has none)."""
    asked = oai.penalties(req)
    if not asked:
        return prepared
    return replace(prepared, request=replace(prepared.request, **asked))


def _prompts(
    service: OpenAIBackend, req: OpenAIRequest
) -> list[tuple[str | None, list[int] | None]] | Refusal:
    """(prompt text, prompt token ids when given as ids) per prompt; chat has one (rendered later)."""
    if isinstance(req, ChatCompletionRequest):
        return [(None, None)]
    p = req.prompt
    if isinstance(p, str):
        return [(p, None)]
    if not p:
        return Refusal(400, "prompt", "must not be empty")
    if isinstance(p[0], str):
        return [(str(text), None) for text in p]
    served = service.host.served
    if served is None:
        return Refusal(503, None, service.host.not_ready_reason)
    rows = [p] if isinstance(p[0], int) else p
    decode = served.model.tokenizer.decode
    return [(str(decode(ids, skip_special_tokens=True)), list(ids)) for ids in rows]  # type: ignore[arg-type]


def _limit(service: OpenAIBackend, req: OpenAIRequest) -> int:
    return oai.max_tokens(req, min(16, service.settings.config.limits.max_new_tokens))


async def _unary(
    service: OpenAIBackend,
    record: RequestRecord,
    req: OpenAIRequest,
    prompts: list[tuple[str | None, list[int] | None]],
) -> Response:
    answer = await _complete(service, record, req, prompts)
    if isinstance(answer, Refusal):
        return error_response(answer, record)
    headers = {"x-request-id": record.request_id, "Server-Timing": record.timings.server_timing()}
    if req.stream:  # whole choices as a stream (oai.streams_whole_answers)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        events = oai.buffered_events(answer, include_usage)
        return StreamingResponse(
            iter(events), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    return JSONResponse(answer, headers=headers)


async def _complete(
    service: OpenAIBackend,
    record: RequestRecord,
    req: OpenAIRequest,
    prompts: list[tuple[str | None, list[int] | None]],
) -> dict[str, Any] | Refusal:
    """Every choice of every prompt, as the OpenAI response body."""
    chat = isinstance(req, ChatCompletionRequest)
    choices: list[dict[str, Any]] = []
    prompt_total = output_total = 0
    for p_index, (text, ids) in enumerate(prompts):
        for c in range(req.n):
            body = oai.to_input(req, text, _limit(service, req), c)
            if isinstance(req, CompletionRequest) and req.echo and body.max_new_tokens == 0:
                choice: Choice | Refusal = _score_only(service, record, body, ids)
            else:
                choice = await _one_choice(service, record, req, body)
            if isinstance(choice, Refusal):
                return choice
            index = p_index * req.n + c
            logprobs = await _logprobs(service, req, choice, ids)
            if isinstance(logprobs, Refusal):
                return logprobs
            if chat:
                choices.append(oai.chat_choice(index, choice.text, choice.finish_reason, logprobs))
            else:
                echoed = (choice.prompt if ids is None else text or "") if req.echo else ""  # type: ignore[union-attr]
                choices.append(
                    oai.completion_choice(index, echoed + choice.text, choice.finish_reason, logprobs)
                )
            if c == 0:
                prompt_total += choice.prompt_tokens
            output_total += choice.output_tokens
    record.status, record.prompt_tokens, record.output_tokens = "ok", prompt_total, output_total
    usage = oai.usage(prompt_total, output_total)
    id_ = oai.new_id("chatcmpl" if chat else "cmpl")
    build = oai.chat_completion if chat else oai.completion
    return build(id_, req.model, choices, usage)


async def _one_choice(
    service: OpenAIBackend, record: RequestRecord, req: OpenAIRequest, body: GenerateInput
) -> Choice | Refusal:
    prepared = service.prepare(record, body)
    if isinstance(prepared, Refusal):
        return _renamed(prepared)
    prepared = _with_penalties(prepared, req)
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        return await _constrained(service, record, prepared, fmt)
    outcome = await service.run_unary(record, prepared)
    if isinstance(outcome, Refusal):
        return _renamed(outcome)
    return Choice(
        outcome["text"], outcome["finish_reason"], outcome["prompt_tokens"], outcome["output_tokens"],
        prepared.request.prompt,
    )  # fmt: skip


def _score_only(
    service: OpenAIBackend, record: RequestRecord, body: GenerateInput, ids: list[int] | None
) -> Choice | Refusal:
    """``echo`` with ``max_tokens: 0``: the prompt's log-probabilities only (checked like a one-token
    request: limits and KV-cache fit), no generation."""
    prepared = service.prepare(record, body.model_copy(update={"max_new_tokens": 1}))
    if isinstance(prepared, Refusal):
        return _renamed(prepared)
    req = prepared.request
    tokens = len(ids) if ids is not None else req.prompt_tokens or 0
    return Choice("", "length", tokens, 0, req.prompt)


def _renamed(refusal: Refusal) -> Refusal:
    """lockgate's field names -> the OpenAI parameter the client set."""
    names = {"max_new_tokens": "max_tokens", "user_id": "user"}
    field = refusal.field.rsplit(".", 1)[-1] if refusal.field else None
    if field in names:
        message = refusal.message
        return replace(refusal, field=names[field], message=message)
    return refusal


async def _constrained(
    service: OpenAIBackend, record: RequestRecord, prepared: Prepared, fmt: oai.ResponseFormat
) -> Choice | Refusal:
    from lockgate.bentos.constrained import Grammars, generate_constrained

    served = service.host.served
    assert served is not None
    grammars = _grammars.get(id(served.model))
    if grammars is None:
        grammars = await asyncio.to_thread(Grammars, served.model)
        _grammars.clear()  # one served model at a time: a hot swap drops the old grammars
        _grammars[id(served.model)] = grammars
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    try:
        grammar = await asyncio.to_thread(grammars.compile, schema)
    except ValueError as exc:
        return Refusal(400, "response_format.json_schema", str(exc))
    refused = await service.host.reserve(record, prepared.reserve_tokens)
    if refused is not None:
        return refused
    req = prepared.request
    try:
        record.model_version = served.version
        gen: Generation = await asyncio.to_thread(
            generate_constrained, served.model, grammar, req.prompt, req.max_new_tokens, req.temperature,
            req.top_p, req.seed,
        )  # fmt: skip
    except Exception as exc:
        return failure(record, exc)
    finally:
        record.clean_up()
    record.succeed(gen, service.log_text)
    return Choice(gen.text, gen.finish_reason, gen.prompt_tokens, gen.output_tokens, req.prompt)


_grammars: dict[int, Any] = {}


async def _logprobs(
    service: OpenAIBackend, req: OpenAIRequest, choice: Choice, ids: list[int] | None
) -> dict[str, Any] | Refusal | None:
    """The choice's ``logprobs`` object, scored in one forward pass; None when not asked for."""
    from lockgate.bentos.scoring import prompt_ids, score_tokens, text_ids

    if isinstance(req, ChatCompletionRequest):
        if not req.logprobs:
            return None
        top = req.top_logprobs or 0
    else:
        if req.logprobs is None and not req.echo:
            return None
        top = req.logprobs or 0
    served = service.host.served
    if served is None:
        return Refusal(503, None, service.host.not_ready_reason)
    model = served.model
    context = ids if ids is not None else prompt_ids(model, choice.prompt)
    answer = text_ids(model, choice.text)
    scored = await asyncio.to_thread(score_tokens, model, context + answer, top)
    if isinstance(req, ChatCompletionRequest):
        return oai.chat_logprobs([(t, lp or 0.0, alts) for t, lp, alts in scored[len(context) :]])
    if req.echo:
        return oai.completion_logprobs(scored)
    return oai.completion_logprobs(scored[len(context) :])


async def _stream(
    service: OpenAIBackend, record: RequestRecord, req: OpenAIRequest, text: str | None
) -> Response:
    prepared = service.prepare(record, oai.to_input(req, text, _limit(service, req), 0))
    if isinstance(prepared, Refusal):
        return error_response(_renamed(prepared), record)
    started = await service.start_stream(record, _with_penalties(prepared, req))
    if isinstance(started, Refusal):
        return error_response(started, record)
    chunks = stream_chunks(started)
    try:
        first = await first_chunk(chunks, started.cancel, record.client_receive)
    except ClientGone as gone:
        record.fail(str(gone))
        return client_gone_response()
    except Exception as exc:
        started.cancel()
        return error_response(failure(record, exc), record)
    events = _events(service, record, req, started, chunks, first)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(
    service: OpenAIBackend,
    record: RequestRecord,
    req: OpenAIRequest,
    stream: TokenStream,
    chunks: AsyncIterator[str],
    first: str | None,
) -> AsyncIterator[str]:
    """SSE: (chat: a role delta first) one chunk per text piece, one with the finish reason, the usage
    chunk when ``stream_options.include_usage``, then ``data: [DONE]``."""
    chat = isinstance(req, ChatCompletionRequest)
    id_, created = oai.new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    def chunk(text: str | None, reason: str | None = None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return oai.chat_chunk(id_, req.model, created, delta, reason)
        return oai.completion_chunk(id_, req.model, created, text or "", reason)

    try:
        if chat:
            yield oai.sse(oai.chat_chunk(id_, req.model, created, {"role": "assistant", "content": ""}))
        piece = first
        while piece is not None:
            if piece:
                yield oai.sse(chunk(piece))
            piece = await next_chunk(chunks)
    finally:
        stream.cancel()
    gen = stream.generation
    if gen is None:
        record.fail("stream ended without a result")
        return
    record.succeed(gen, service.log_text)
    yield oai.sse(chunk(None, gen.finish_reason))
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = oai.usage(gen.prompt_tokens, gen.output_tokens)
        build = oai.chat_chunk if chat else oai.completion_chunk
        yield oai.sse(build(id_, req.model, created, {} if chat else "", usage_=usage, with_choice=False))  # type: ignore[arg-type]
    yield oai.DONE
