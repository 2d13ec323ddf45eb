"""What a generation request is, what it may ask for, and why it is refused: the request path's first step.

No bentoml, no torch: pydantic, the standard library and the chat renderer only. :func:`prepare` is the
one check every endpoint (``/generate``, each ``/generate_batch`` item, the WebSocket) runs before a
request may wait for the model; it is pure — the model's tokenizer, the feature flags and the KV-cache
limit are passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockgate.bentos.chat import ChatMessage, ChatTemplateError, render_chat
from lockgate.bentos.config import ServiceConfig

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation

Endpoint = Literal[
    "generate", "generate_stream", "generate_batch", "generate_ws",
    "v1_chat_completions", "v1_completions", "v1_models",
]  # fmt: skip
#: URL path (the end of it: BentoML may add a prefix) -> the endpoint accounted, for the HTTP endpoints.
HTTP_ENDPOINTS: dict[str, Endpoint] = {
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/generate_batch": "generate_batch",
    "/v1/chat/completions": "v1_chat_completions",
    "/v1/completions": "v1_completions",
    "/v1/models": "v1_models",
}
OPENAI_ENDPOINTS = ("v1_chat_completions", "v1_completions", "v1_models")
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 200  # per stop string: a stop sequence is a few tokens, not a document
MAX_USER_ID_CHARS = 256  # a user id is hashed into the request log and routes sticky canaries
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerateRequest:
    """One validated-by-type request, as every endpoint receives it (chat messages already rendered)."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    user_id: str | None
    prompt_field: str = "prompt"  # "messages" for a chat request: the field a prompt limit names
    prompt_tokens: int | None = None  # counted at admission; the batcher sizes padded batches with it
    # OpenAI's penalties (set by the /v1 API only): vLLM's, or bentos/penalties.py on lockgate's
    # transformers engines (the continuous engine hands penalized requests to the micro-batcher).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalties(self) -> dict[str, float]:
        """The penalties this request sets (non-zero), by their OpenAI parameter names."""
        named = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}
        return {name: value for name, value in named.items() if value != 0.0}


class GenerateInput(BaseModel):
    """The body of one generation request: ``prompt`` or chat ``messages`` (exactly one), plus sampling.

    /generate's own signature mirrors it (BentoML builds its schema from the signature); the batch items
    and WebSocket messages are validated with it, so all endpoints accept the same fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Text to continue. Give this or messages.")
    messages: list[ChatMessage] | None = Field(
        None, description="Chat turns, rendered with the model's chat template (else 'role: content' lines)."
    )
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    user_id: str | None = None


#: The fields each JSON route accepts; bentos/front_door.py refuses any other with 400 naming it.
GENERATE_FIELDS = frozenset(GenerateInput.model_fields)
STRICT_BODIES: dict[str, frozenset[str]] = {
    "/generate": GENERATE_FIELDS,
    "/generate_stream": GENERATE_FIELDS,
    "/generate_batch": frozenset({"requests"}),
}


PHASES = ("auth", "tokenize", "queue", "prefill", "decode", "postprocess", "total")


@dataclass
class PhaseTimings:
    """Where a request's server time went (exercise 9.8), in seconds.

    ``auth`` key check; ``tokenize`` chat rendering + counting prompt tokens for the KV reservation;
    ``queue`` waiting for KV-cache room and for a batch (or the model) to start; ``prefill`` start of
    generation to the first new token (the runtime's own encoding of the batch included); ``decode``
    the remaining tokens; ``postprocess`` detokenising, stop strings and building the response;
    ``total`` arrival to response. The client adds ``network`` = its own time - ``total``.
    """

    auth: float = 0.0
    tokenize: float = 0.0
    queue: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0
    generate_started: float | None = field(default=None, repr=False)  # perf_counter at the model call

    def record_generation(self, gen: Generation) -> None:
        """Split the model call into prefill and decode; the rest of the time until now is post-processing."""
        self.prefill = gen.first_token_s or 0.0
        self.decode = max(0.0, gen.latency_s - self.prefill)
        if self.generate_started is not None:
            self.postprocess = max(0.0, time.perf_counter() - self.generate_started - gen.latency_s)

    def as_ms(self) -> dict[str, float]:
        return {name: round(getattr(self, name) * 1000.0, 3) for name in PHASES}

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value (W3C), durations in ms."""
        return ", ".join(f"{name};dur={ms}" for name, ms in self.as_ms().items())


class GenerateResponse(BaseModel):
    """Body of a successful ``POST /generate``."""

    text: str = Field(description="The continuation only, special tokens removed.")
    prompt_tokens: int
    output_tokens: int
    latency_ms: float = Field(description="Server time for this request, queueing included.")
    time_to_first_token_ms: float | None = Field(
        None, description="Time from the batch's start to its first generated token (canary TTFT check)."
    )
    model_version: str
    request_id: str
    finish_reason: Literal["eos", "stop", "length"]
    confidence: float | None = Field(
        None, description="Calibrated probability of the first generated token (feedback → ECE)."
    )
    timings: dict[str, float] | None = Field(
        None, description="Server time per phase in ms (auth, tokenize, queue, prefill, decode, ...)."
    )
    cached: bool = Field(False, description="Answered from the response cache (greedy requests only).")


@dataclass(frozen=True)
class Problem:
    """Why a request is refused (HTTP 422), and which field is at fault."""

    field: str
    message: str


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no generation: 400/422 naming ``field``, 401/429 (API key), 503 (not ready,
    or queue full with Retry-After), 500 (generation failed). One shape for the HTTP endpoints, batch
    items and the WebSocket. ``request`` is the request as far as it was understood (for its log row)."""

    status: int
    field: str | None
    message: str
    retry_after_s: float | None = None
    queue_full: bool = False
    request: GenerateRequest | None = None
    prefixed: bool = True  # the error text starts with the field (an API-key refusal's does not)

    @property
    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field and self.prefixed else self.message

    @property
    def is_error(self) -> bool:
        """Client faults and backpressure are refusals; not ready and failures count as errors."""
        return self.status >= 500 and not self.queue_full


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and may now wait for the model."""

    request: GenerateRequest
    headers: dict[str, str]  # feature flags applied
    reserve_tokens: int  # prompt + max_new_tokens: its worst-case KV-cache use


def check_limits(req: GenerateRequest, config: ServiceConfig) -> Problem | None:
    """The first limit ``req`` breaks, or None. Types were already checked by BentoML (400)."""
    limits = config.limits
    if not req.prompt.strip():
        return Problem(req.prompt_field, "must not be empty or whitespace only")
    if len(req.prompt) > limits.max_prompt_chars:
        return Problem(
            req.prompt_field, f"must be at most {limits.max_prompt_chars} characters, got {len(req.prompt)}"
        )
    if req.max_new_tokens < 1:
        return Problem("max_new_tokens", "must be >= 1")
    if req.max_new_tokens > limits.max_new_tokens:
        return Problem("max_new_tokens", f"must be <= {limits.max_new_tokens}")
    if not 0.0 <= req.temperature <= 100.0:  # also refuses NaN
        return Problem("temperature", "must be between 0 and 100")
    if not 0.0 < req.top_p <= 1.0:
        return Problem("top_p", "must be in (0, 1]")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        return Problem("seed", f"must be between 0 and {MAX_SEED}")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
        return Problem("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
    longest = max((len(s) for s in req.stop), default=0)
    if longest > MAX_STOP_CHARS:
        return Problem("stop", f"each string must be at most {MAX_STOP_CHARS} characters, got {longest}")
    if req.user_id is not None and len(req.user_id) > MAX_USER_ID_CHARS:
        return Problem("user_id", f"must be at most {MAX_USER_ID_CHARS} characters, got {len(req.user_id)}")
    return None


def kv_fit(req: GenerateRequest, prompt_tokens: int, limit: int | None) -> Problem | None:
    """A request must fit the KV-cache capacity and the model's context (``limit`` tokens) on its own, or
    it could never run (queueing it would block everyone behind it)."""
    if limit is None:
        return None
    if prompt_tokens >= limit:
        return Problem(
            req.prompt_field,
            f"is {prompt_tokens} tokens; at most {limit - 1} fit (KV-cache capacity / model context)",
        )
    if prompt_tokens + req.max_new_tokens > limit:
        return Problem(
            "max_new_tokens",
            f"must be <= {limit - prompt_tokens} for this {prompt_tokens}-token prompt: prompt + new "
            f"tokens must fit {limit} tokens (KV-cache capacity / model context)",
        )
    return None


def to_request(body: GenerateInput, prompt: str, prompt_field: str) -> GenerateRequest:
    stop = tuple(body.stop or ())
    return GenerateRequest(
        prompt, body.max_new_tokens, body.temperature, body.top_p, body.seed, stop, body.user_id, prompt_field
    )


def validate_input(raw: Any, field_path: str) -> GenerateInput | Refusal:
    """Validate one request body that arrived as plain JSON (batch item, WebSocket message): 400 naming
    the first bad field as ``<field_path>.<field>``."""
    if not isinstance(raw, dict):
        return Refusal(400, field_path or "body", f"must be a JSON object, got {type(raw).__name__}")
    try:
        return GenerateInput.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        name = ".".join(part for part in (field_path, loc) if part) or "body"
        return Refusal(400, name, str(first.get("msg", "invalid")))


@dataclass(frozen=True)
class ModelView:
    """What :func:`prepare` needs of the served model: its tokenizer (chat template) and token count."""

    tokenizer: Any
    count_tokens: Callable[[str], int]
    kv_limit: int | None  # min(KV-cache capacity, model context) in tokens; None = no budget


FlagPolicy = Callable[[GenerateRequest], tuple[GenerateRequest, dict[str, str]]]


def no_flags(req: GenerateRequest) -> tuple[GenerateRequest, dict[str, str]]:
    return req, {}


def prepare(
    body: GenerateInput,
    config: ServiceConfig,
    model: ModelView | None,
    not_ready: str,
    flags: FlagPolicy = no_flags,
    prefix: str = "",
) -> Prepared | Refusal:
    """Check one request up to the point where it may wait for the model: prompt xor messages (400),
    readiness (503, ``model`` None: ``not_ready`` says why), chat rendering, limits and KV-cache fit
    (422). Applies the feature flags and counts the prompt's tokens."""
    at = f"{prefix}." if prefix else ""
    if (body.prompt is None) == (body.messages is None):
        if body.prompt is None:
            return Refusal(400, f"{at}prompt", "required: give prompt or chat messages")
        return Refusal(400, f"{at}messages", "give either prompt or messages, not both")
    if model is None:
        # The request still goes with it, so the log row has the prompt's length (as before chat existed).
        known = to_request(body, body.prompt, "prompt") if body.prompt is not None else None
        return Refusal(503, None, not_ready, request=known)
    prompt, field_name = body.prompt, "prompt"
    if body.messages is not None:
        if not body.messages:
            return Refusal(422, f"{at}messages", "must hold at least one message")
        try:
            prompt, field_name = render_chat(model.tokenizer, body.messages), "messages"
        except ChatTemplateError as exc:
            return Refusal(422, f"{at}messages", str(exc))
    req = to_request(body, prompt or "", field_name)
    problem = check_limits(req, config)
    if problem is not None:
        return Refusal(422, f"{at}{problem.field}", problem.message, request=req)
    req, headers = flags(req)
    prompt_tokens = model.count_tokens(req.prompt)
    fit = kv_fit(req, prompt_tokens, model.kv_limit)
    if fit is not None:
        return Refusal(422, f"{at}{fit.field}", fit.message, request=req)
    return Prepared(replace(req, prompt_tokens=prompt_tokens), headers, prompt_tokens + req.max_new_tokens)
