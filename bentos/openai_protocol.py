"""The OpenAI API's wire format: request bodies, responses, stream chunks and error objects, in OpenAI's
exact shapes (https://platform.openai.com/docs/api-reference), and their translation to lockgate's own
request (:class:`~lockgate.bentos.protocol.GenerateInput`).

No bentoml, no torch: pydantic and the standard library. Serving glue lives in bentos/openai_routes.py.

Every request model forbids extra fields, and a field lockgate accepts but cannot honour is refused
(:func:`unsupported`): a client never gets an answer that silently ignored what it asked for.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockgate.bentos.chat import ChatMessage
from lockgate.bentos.protocol import GenerateInput, Refusal

FinishReason = Literal["stop", "length"]
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
PENALTIES = ("presence_penalty", "frequency_penalty")

#: HTTP status -> OpenAI's error ``type`` (what the SDK's typed exceptions are built from is the status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


def error_object(
    status: int, message: str, param: str | None, request_id: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: OpenAI's error body."""
    body: dict[str, Any] = {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                  "code": str(status)}
    }  # fmt: skip
    if request_id is not None:
        body["request_id"] = request_id
    return body


def refusal_error(refusal: Refusal, request_id: str | None = None) -> dict[str, Any]:
    return error_object(refusal.status, refusal.text, refusal.field, request_id)


# -- requests --------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Common(BaseModel):
    """Fields both endpoints share. Penalties (-2 to 2, OpenAI's semantics) run on every engine except
    constrained decoding (refused there, see :func:`unsupported`)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Common):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool = False
    response_format: ResponseFormat | None = None


OpenAIRequest = ChatCompletionRequest | CompletionRequest


def parse(model: type[BaseModel], raw: Any) -> BaseModel | Refusal:
    """Validate a JSON body; 400 naming the first bad or unknown field."""
    if not isinstance(raw, dict):
        return Refusal(400, "body", f"must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        unknown = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            return Refusal(400, unknown[0], f"unknown or unsupported parameter(s): {', '.join(unknown)}")
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ())) or "body"
        return Refusal(400, loc, str(first.get("msg", "invalid")))


def unsupported(req: ChatCompletionRequest | CompletionRequest) -> Refusal | None:
    """400 for values lockgate accepts in the schema but cannot honour, naming the parameter."""
    for name in PENALTIES:
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:  # also refuses NaN
            return Refusal(400, name, "must be between -2 and 2")
        if value and req.response_format is not None and req.response_format.type != "text":
            return Refusal(400, name, "is not supported with a constrained response_format")
    if not 1 <= req.n <= MAX_N:
        return Refusal(400, "n", f"must be between 1 and {MAX_N}")
    if req.stream_options is not None and not req.stream:
        return Refusal(400, "stream_options", "is only allowed with stream: true")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            return Refusal(400, "top_logprobs", "requires logprobs: true")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            return Refusal(400, "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            return Refusal(400, "max_tokens", "give max_tokens or max_completion_tokens, not both")
    else:
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            return Refusal(400, "logprobs", f"must be between 0 and {MAX_COMPLETION_LOGPROBS}")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        return Refusal(400, "response_format.json_schema", "required when type is json_schema")
    return None


def streams_whole_answers(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether a ``stream: true`` request is answered as whole choices sent as stream chunks (see
    :func:`buffered_events`): ``n`` > 1, log-probabilities, ``echo`` and constrained output are
    computed on the whole answer (one scoring pass; a grammar-guided generation), not token by token."""
    if not req.stream:
        return False
    constrained = req.response_format is not None and req.response_format.type != "text"
    if isinstance(req, ChatCompletionRequest):
        scored = bool(req.logprobs)
    else:
        scored = req.echo or req.logprobs is not None
    return req.n != 1 or scored or constrained


def penalties(req: ChatCompletionRequest | CompletionRequest) -> dict[str, float]:
    """The penalties ``req`` sets (non-zero), by parameter name."""
    return {name: float(v) for name in PENALTIES if (v := getattr(req, name))}


def max_tokens(req: ChatCompletionRequest | CompletionRequest, default: int) -> int:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return default if req.max_tokens is None else req.max_tokens


def to_input(
    req: ChatCompletionRequest | CompletionRequest, prompt: str | None, tokens: int, choice: int
) -> GenerateInput:
    """lockgate's request for choice ``choice`` of ``req``. With a seed, choice i samples with seed + i,
    so the n choices differ and the whole answer is reproducible."""
    seed = None if req.seed is None else req.seed + choice
    common: dict[str, Any] = {
        "max_new_tokens": tokens, "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p, "seed": seed, "stop": req.stop_list(),
        "user_id": req.user,
    }  # fmt: skip
    if isinstance(req, ChatCompletionRequest):
        return GenerateInput.model_construct(prompt=None, messages=req.messages, **common)
    return GenerateInput.model_construct(prompt=prompt, messages=None, **common)


# -- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> FinishReason:
    """lockgate's ``eos``/``stop``/``length`` -> OpenAI's ``stop``/``length``."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    id_: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_, "system_fingerprint": None,
    }  # fmt: skip


def chat_choice(index: int, text: str, reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish_reason(reason),
    }


def completion(id_: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
    return {
        "id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_, "system_fingerprint": None,
    }  # fmt: skip


def completion_choice(
    index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": None if reason is None else finish_reason(reason),
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(scored: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion from (token, logprob, top alternatives) rows."""
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "bytes": _token_bytes(tok),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _token_bytes(t)} for t, v in top],
            }
            for tok, lp, top in scored
        ],
        "refusal": None,
    }


def completion_logprobs(
    scored: list[tuple[str, float | None, list[tuple[str, float]]]], start_offset: int = 0
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset.
    The first prompt token of an echo has no log-probability (null), as in OpenAI's API."""
    offsets, at = [], start_offset
    for tok, _lp, _top in scored:
        offsets.append(at)
        at += len(tok)
    return {
        "tokens": [tok for tok, _lp, _top in scored],
        "token_logprobs": [lp for _tok, lp, _top in scored],
        "top_logprobs": [None if lp is None else dict(top) for _tok, lp, top in scored],
        "text_offset": offsets,
    }


ServedModel = tuple[str, str, dict[str, Any]]  # (id, owned_by, metadata) of one served version


def served_model(model_id: str, role: str, version: str, ready: bool) -> ServedModel:
    """How ``GET /v1/models`` describes one served version, on a service and on the router alike:
    ``owned_by`` ``lockgate-<role>`` and metadata naming the role (stable/canary) and version."""
    return model_id, f"lockgate-{role}", {"version": version, "role": role, "ready": ready}


def models_list(entries: list[ServedModel]) -> dict[str, Any]:
    """``GET /v1/models``: one entry per served version (:func:`served_model`)."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": id_, "object": "model", "created": created, "owned_by": owner, "metadata": meta}
            for id_, owner, meta in entries
        ],
    }


# -- server-sent events ----------------------------------------------------------------------------

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def chat_chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    reason: str | None = None,
    usage_: dict[str, int] | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; the usage chunk has no choices (``with_choice`` False)."""
    choices = (
        [{"index": 0, "delta": delta, "logprobs": None,
          "finish_reason": None if reason is None else finish_reason(reason)}]
        if with_choice else []
    )  # fmt: skip
    return _chunk("chat.completion.chunk", id_, model, created, choices, usage_)


def completion_chunk(
    id_: str,
    model: str,
    created: int,
    text: str,
    reason: str | None = None,
    usage_: dict[str, int] | None = None,
    with_choice: bool = True,
) -> dict[str, Any]:
    choices = [completion_choice(0, text, reason, None)] if with_choice else []
    return _chunk("text_completion", id_, model, created, choices, usage_)


def _chunk(
    object_: str,
    id_: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None,
) -> dict[str, Any]:
    """A stream chunk's envelope; ``usage`` only on the usage chunk (the one without choices)."""
    chunk: dict[str, Any] = {
        "id": id_, "object": object_, "created": created, "model": model,
        "system_fingerprint": None, "choices": choices,
    }  # fmt: skip
    if usage_ is not None or not choices:
        chunk["usage"] = usage_
    return chunk


def buffered_events(response: dict[str, Any], include_usage: bool) -> list[str]:
    """A whole ``chat.completion`` / ``text_completion`` as the stream a client expects: per choice
    (its ``index`` kept) a chunk with the content and its log-probabilities, then one with the finish
    reason; the usage chunk when asked for; ``[DONE]``. The SDKs reassemble it like any stream."""
    chat = response["object"] == "chat.completion"
    id_, model, created = response["id"], response["model"], response["created"]
    events: list[str] = []
    for choice in response["choices"]:
        if chat:
            delta = {"role": "assistant", "content": choice["message"]["content"]}
            first = chat_chunk(id_, model, created, delta)
            last = chat_chunk(id_, model, created, {}, choice["finish_reason"])
        else:
            first = completion_chunk(id_, model, created, choice["text"])
            last = completion_chunk(id_, model, created, "", choice["finish_reason"])
        first["choices"][0].update(index=choice["index"], logprobs=choice["logprobs"])
        last["choices"][0]["index"] = choice["index"]
        events += [sse(first), sse(last)]
    if include_usage:
        usage_ = response["usage"]
        if chat:
            tail = chat_chunk(id_, model, created, {}, usage_=usage_, with_choice=False)
        else:
            tail = completion_chunk(id_, model, created, "", usage_=usage_, with_choice=False)
        events.append(sse(tail))
    return [*events, DONE]
