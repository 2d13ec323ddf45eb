"""The LLM service: ``bentoml serve bentos.llm_service:LLMService``.

Configured only through environment variables, read at import (the same module serves and builds):

* ``LOCKGATE_MODEL_URI``      local model folder or ``models:/...`` (required to serve, not to build)
* ``LOCKGATE_MODEL_NAME``     metric/log label (default: last part of the URI)
* ``LOCKGATE_MODEL_VERSION``  metric/log label (default ``unknown``)
* ``LOCKGATE_SERVICE_ROLE``   e.g. ``stable`` / ``canary`` (default ``stable``)
* ``LOCKGATE_REQUEST_LOG``    SQLite file for the request log (default: no request log)
* ``LOCKGATE_LOG_TEXT``       ``1`` stores raw prompt/output text in the request log (default ``0``)
* ``LOCKGATE_SERVICE_CONFIG`` JSON object, see :class:`ServiceConfig` (default ``{}``)
* ``LOCKGATE_API_KEYS_FILE``  hashed API keys + rate limits (bentos/auth.py); unset = no auth
* ``LOCKGATE_REGISTRY_POLL_S`` how often a stage/alias URI is re-resolved (default 2)
* ``LOCKGATE_FEATURE_FLAGS_FILE`` feature flags, re-read on change (bentos/feature_flags.py says what
  ``stop_at_newline`` and ``max_new_tokens_cap`` do); unset = no flags

Endpoints: ``POST /generate`` (JSON; ``prompt`` or chat ``messages``), ``POST /generate_batch`` (a list
of /generate bodies, answered in order, per-item errors), ``POST /generate_stream`` (text chunks),
``/generate_ws`` (WebSocket, token messages; bentos/websocket.py), ``GET /capacity`` (KV-cache plan and
queue), plus BentoML's ``/readyz`` (200 only once the model is loaded and warmed up), ``/livez`` and
``/metrics``. Every request — answered, refused or failed — gets one request-log row, one
``llm_requests_total`` increment and one JSON log line, written by :class:`Accounting` (a batch: one
per item).

Before a request runs it reserves ``prompt + max_new_tokens`` tokens of the KV-cache budget
(bentos/kv_budget.py); it waits while the cache is full, and gets 503 with Retry-After when
``max_queue`` requests already wait. Responses carry their server time per phase (``timings`` in the
body, ``Server-Timing`` header) for ``lockgate profile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, StreamingResponse

from bentos.auth import KeyStore
from bentos.chat import ChatMessage, ChatTemplateError, render_chat
from bentos.feature_flags import FeatureFlags, apply_service_flags
from bentos.kv_budget import (
    KVAdmission,
    KVBudget,
    QueueFull,
    free_memory_bytes,
    model_kv_shape,
    plan_budget,
)
from bentos.model_resolver import resolve_model_dir
from bentos.request_log import RequestLog, RequestRow, Status, hash_user
from bentos.response_cache import CachedAnswer, ResponseCacheConfig, build_cache, cache_key
from bentos.tracing import TracingConfig, build_tracer
from bentos.websocket import build_app as build_websocket_app

if TYPE_CHECKING:
    # Imported lazily at runtime: torch + transformers take seconds to import, and `bentoml build`
    # and the serve supervisor process import this module without ever generating.
    from bentos.continuous import ContinuousEngine
    from bentos.runtime import Generation, LoadedModel, TokenStream

logger = logging.getLogger("lockgate.service")
request_logger = logging.getLogger("lockgate.requests")

ENDPOINTS = ("generate", "generate_stream", "generate_batch")
Endpoint = Literal["generate", "generate_stream", "generate_batch", "generate_ws"]
WARMUP_PROMPT = "Warm-up: the quick brown fox jumps over the lazy dog."


# -- configuration -------------------------------------------------------------------------------


class ServiceConfig(BaseModel):
    """Resources, traffic and limits of one service (``LOCKGATE_SERVICE_CONFIG``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: int = Field(
        0, ge=0, description="GPUs to request; 0 = none. BentoML still serves on CPU when none exist."
    )
    cpu: str | None = Field(None, description="CPU request, e.g. '2' or '500m'; None = no request.")
    memory: str | None = Field(None, description="Memory request, e.g. '4Gi'; None = no request.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most /generate requests run as one batch.")
    max_latency_ms: float = Field(
        10.0, ge=0, le=10_000, description="Longest a request waits for others to join its batch."
    )
    max_prompt_chars: int = Field(8000, ge=1, description="Longer prompts are refused with 422.")
    max_new_tokens: int = Field(256, ge=1, description="Cap on a request's max_new_tokens (422 above).")
    timeout_s: float = Field(
        60.0, gt=0, description="BentoML traffic timeout: time to the first response byte."
    )
    concurrency: int = Field(32, ge=1, description="Requests in flight before BentoML answers 429.")
    warmup_requests: int = Field(
        2, ge=0, description="Generations run after loading, before /readyz says ready."
    )
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0, description="USD, for llm_api_cost_dollars_total.")
    price_per_1k_completion_tokens: float = Field(
        0.0, ge=0, description="USD, for llm_api_cost_dollars_total."
    )
    kv_cache_budget_mb: float | None = Field(
        None,
        gt=0,
        description="KV-cache memory budget in MB (10^6 bytes); None = derived from free memory at load "
        "(bentos/kv_budget.py). Requests reserve prompt + max_new_tokens of it before they run.",
    )
    max_queue: int = Field(
        64, ge=0, description="Requests that may wait for KV-cache room; beyond it: 503 with Retry-After."
    )
    max_batch_items: int = Field(64, ge=1, le=4096, description="Most requests in one POST /generate_batch.")
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry spans per request (bentos/tracing.py)."
    )
    response_cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig, description="Cache of greedy answers (bentos/response_cache.py)."
    )
    max_step_tokens: int = Field(
        2048,
        ge=16,
        le=65_536,
        description="Continuous engine: most tokens (decode + prefill) per forward step.",
    )
    engine: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: greedy requests join the running batch between decode steps "
        "(bentos/continuous.py); static: whole requests are batched (MicroBatcher). Sampling requests "
        "always use the micro-batcher.",
    )


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the environment says about this service instance."""

    model_uri: str | None
    model_name: str
    model_version: str
    role: str
    request_log: Path | None
    log_text: bool
    config: ServiceConfig
    api_keys_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        """Parse the ``LOCKGATE_*`` variables; raises ValueError naming the bad variable."""
        uri = env.get("LOCKGATE_MODEL_URI") or None
        raw_config = env.get("LOCKGATE_SERVICE_CONFIG") or "{}"
        try:
            config = ServiceConfig.model_validate_json(raw_config)
        except ValidationError as exc:
            raise ValueError(f"LOCKGATE_SERVICE_CONFIG is invalid: {exc}") from exc
        log_path = env.get("LOCKGATE_REQUEST_LOG") or None
        return cls(
            model_uri=uri,
            model_name=env.get("LOCKGATE_MODEL_NAME") or _default_model_name(uri),
            model_version=env.get("LOCKGATE_MODEL_VERSION") or "unknown",
            role=env.get("LOCKGATE_SERVICE_ROLE") or "stable",
            request_log=Path(log_path) if log_path else None,
            log_text=_parse_flag("LOCKGATE_LOG_TEXT", env.get("LOCKGATE_LOG_TEXT", "")),
            config=config,
            api_keys_file=Path(env["LOCKGATE_API_KEYS_FILE"]) if env.get("LOCKGATE_API_KEYS_FILE") else None,
        )


def _default_model_name(uri: str | None) -> str:
    """The registered name of a ``models:/NAME/...`` URI, else the folder's name."""
    if not uri:
        return "unknown"
    if uri.startswith("models:/"):
        return uri.removeprefix("models:/").split("/")[0].split("@")[0]
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _parse_flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "0", "false", "no"):
        return False
    if lowered in ("1", "true", "yes"):
        return True
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


SETTINGS = ServiceSettings.from_env()


# -- requests, limits ----------------------------------------------------------------------------


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


PHASES = ("auth", "tokenize", "queue", "prefill", "decode", "postprocess", "total")


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


MAX_STOP_STRINGS = 8
MAX_SEED = 2**63 - 1


def check_limits(req: GenerateRequest, config: ServiceConfig) -> Problem | None:
    """The first limit ``req`` breaks, or None. Types were already checked by BentoML (400)."""
    if not req.prompt:
        return Problem(req.prompt_field, "must not be empty")
    if len(req.prompt) > config.max_prompt_chars:
        return Problem(
            req.prompt_field, f"must be at most {config.max_prompt_chars} characters, got {len(req.prompt)}"
        )
    if req.max_new_tokens < 1:
        return Problem("max_new_tokens", "must be >= 1")
    if req.max_new_tokens > config.max_new_tokens:
        return Problem("max_new_tokens", f"must be <= {config.max_new_tokens}")
    if not 0.0 <= req.temperature <= 100.0:  # also refuses NaN
        return Problem("temperature", "must be between 0 and 100")
    if not 0.0 < req.top_p <= 1.0:
        return Problem("top_p", "must be in (0, 1]")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        return Problem("seed", f"must be between 0 and {MAX_SEED}")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
        return Problem("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
    return None


# -- accounting: request log, metrics, JSON log line ---------------------------------------------


@dataclass
class RequestRecord:
    """What one request did; filled in by the handler, written once by :class:`Accounting`."""

    request_id: str
    endpoint: Endpoint
    started: float  # time.perf_counter()
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

    def reject(self, problem: Problem) -> None:
        self.status, self.error, self.error_field = (
            "rejected",
            f"{problem.field}: {problem.message}",
            problem.field,
        )

    def fail(self, error: str) -> None:
        self.status, self.error = "error", error

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


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

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.request_log = RequestLog(settings.request_log) if settings.request_log else None
        self._metrics: ServiceMetrics | None = None
        self.serving_version: str | None = None  # set once a model is loaded; follows hot swaps
        self.tracer = build_tracer(settings.config.tracing, "lockgate-llm", settings.model_name)

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
        version = record.model_version or self.serving_version or s.model_version
        latency_ms = record.latency_ms()
        if self.request_log is not None:
            self.request_log.append(
                RequestRow(
                    # Completion time, not arrival: rows then commit in ts order, so a reader polling
                    # with since=<last ts seen> misses nothing.
                    ts=time.time(),
                    request_id=record.request_id,
                    service_role=s.role,
                    model_name=s.model_name,
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
        m.requests.labels(s.model_name, version, status).inc()
        if status != "rejected":  # refusals take microseconds and would drag latency quantiles down
            m.duration.labels(s.model_name, record.endpoint).observe(latency_ms / 1000.0)
        if status == "ok":
            m.tokens.labels("prompt").inc(record.prompt_tokens or 0)
            m.tokens.labels("completion").inc(record.output_tokens or 0)
            cfg = s.config
            cost = (record.prompt_tokens or 0) * cfg.price_per_1k_prompt_tokens / 1000 + (
                record.output_tokens or 0
            ) * cfg.price_per_1k_completion_tokens / 1000
            m.cost.labels(s.model_name, record.customer or "anonymous").inc(cost)
            if record.first_token_s is not None:
                m.ttft.labels(s.model_name).observe(record.first_token_s)
        m.sample_resources()
        line = {
            "event": "llm_request",
            "request_id": record.request_id,
            "endpoint": record.endpoint,
            "model": s.model_name,
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
            "lockgate.model": self.settings.model_name,
            "lockgate.model_version": version,
            "lockgate.role": self.settings.role,
            "lockgate.status": status,
            "gen_ai.usage.input_tokens": record.prompt_tokens or 0,
            "gen_ai.usage.output_tokens": record.output_tokens or 0,
        }
        if record.http_status is not None:
            attributes["http.response.status_code"] = record.http_status
        self.tracer.record(latency_ms / 1000.0, phases, attributes, failed=status == "error")  # type: ignore[union-attr]


ACCOUNTING = Accounting(SETTINGS)
KEYS = KeyStore.from_file(SETTINGS.api_keys_file) if SETTINGS.api_keys_file else None
FLAGS = FeatureFlags.from_env()  # an invalid flag file fails the start-up; later edits apply live


def _apply_flags(req: GenerateRequest) -> tuple[GenerateRequest, dict[str, str]]:
    """The request as the feature flags on for its user make it, and the header naming those flags."""
    if FLAGS is None:
        return req, {}
    policy = apply_service_flags(FLAGS.flags(), req.user_id, req.max_new_tokens, req.stop)
    flagged = replace(req, max_new_tokens=policy.max_new_tokens, stop=policy.stop)
    return flagged, {"x-lockgate-flags": ",".join(policy.applied)}


_CURRENT_RECORD: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "lockgate_request_record", default=None
)


class RequestAccounting:
    """ASGI middleware around the HTTP generation endpoints: gives each request an id and accounts for it.

    It also sees requests BentoML refuses before our handler runs (malformed JSON, missing or
    wrong-typed fields: 400 with pydantic's ``detail``); for those it adds ``field`` to the body, so
    every refusal names its field the same way as our own 422s.
    """

    def __init__(self, app: Any, accounting: Accounting, keys: KeyStore | None = None) -> None:
        self.app = app
        self.accounting = accounting
        self.keys = keys

    async def _refuse_unauthorised(
        self, record: RequestRecord, scope: dict[str, Any], receive: Any, send: Any
    ) -> bool:
        """401 without a valid key, 429 over the key's rate (with Retry-After); True when refused."""
        if self.keys is None:
            return False
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization")
        admission = self.keys.admit(auth.decode("latin-1") if auth else None)
        record.customer = admission.customer
        if admission.status == 200:
            return False
        record.claimed, record.http_status = True, admission.status
        record.status, record.error, record.error_field = "rejected", admission.error, "authorization"
        extra = (
            {"Retry-After": str(max(1, math.ceil(admission.retry_after_s)))}
            if admission.status == 429
            else {}
        )
        response = JSONResponse(
            {"error": admission.error, "field": "authorization", "request_id": record.request_id},
            status_code=admission.status,
            headers={**extra, "x-request-id": record.request_id},
        )
        self.accounting.finish(record)
        await response(scope, receive, send)
        return True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = scope.get("path", "").rsplit("/", 1)[-1]
        if scope["type"] != "http" or endpoint not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        record = RequestRecord(uuid.uuid4().hex, endpoint, time.perf_counter())  # type: ignore[arg-type]
        refused = await self._refuse_unauthorised(record, scope, receive, send)
        record.timings.auth = time.perf_counter() - record.started
        if refused:
            return
        # A context variable, not a `ctx: bentoml.Context` parameter: with ctx, BentoML overwrites the
        # status code of a returned Response with ctx.response.status_code (200), losing our 422s.
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
                    self.accounting.finish(record)
                    await send(start)
                    await send({"type": "http.response.body", "body": new_body})
            else:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    if record.status is None:  # a claimed response that did not say how it went
                        record.fail(f"HTTP {record.http_status} without an outcome")
                    self.accounting.finish(record)  # before the last byte: acknowledged => logged
                await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _CURRENT_RECORD.reset(token)
            record.clean_up()  # a stream whose body never ran still gives its KV reservation back
            if not record.written:
                if record.status in (None, "ok"):
                    record.fail("response not completed (client disconnected, timeout or stream error)")
                self.accounting.finish(record)


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
    new_body = json.dumps({**payload, "error": message, "field": field_name, "request_id": record.request_id})
    encoded = new_body.encode()
    headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(encoded)).encode()))
    return {**start, "headers": headers}, encoded


# -- micro-batching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BatchKey:
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass
class _Pending:
    request: GenerateRequest
    future: asyncio.Future[Generation]
    timings: PhaseTimings | None = None
    enqueued: float = field(default_factory=time.perf_counter)


def batch_key(req: GenerateRequest) -> _BatchKey | None:
    """Which requests may share one ``generate`` call; None = must run alone.

    Requests are grouped when they decode the same way and may differ in ``max_new_tokens``: the
    runtime stops each row at its own budget, and for greedy decoding a row's tokens do not depend
    on its neighbours (left padding is masked). Sampling uses one temperature/top_p per call, so
    those must match. A seeded sampling request runs alone: the RNG stream is shared by the rows of
    a batch, so its output would depend on who else was in the batch, breaking "same seed, same text".
    """
    if req.temperature == 0.0:
        return _BatchKey(0.0, 1.0, req.stop)  # top_p and seed do not matter for greedy
    if req.seed is not None:
        return None
    return _BatchKey(req.temperature, req.top_p, req.stop)


class MicroBatcher:
    """Groups concurrent /generate requests into batched ``LoadedModel.generate`` calls.

    One asyncio task takes the first waiting request, waits at most ``max_latency_s`` for up to
    ``max_batch_size - 1`` more, splits them by :func:`batch_key` and runs each group in a thread
    (the event loop keeps serving /readyz, /metrics and new requests meanwhile). Requests arriving
    while a batch runs queue up for the next one, so under load batches fill without waiting.
    """

    def __init__(
        self,
        model: LoadedModel,
        max_batch_size: int,
        max_latency_s: float,
        on_batch: Callable[[int], None],
        on_wait: Callable[[float], None] = lambda _seconds: None,
        kv_capacity: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._model = model
        self._max_batch_size = max_batch_size
        self._max_latency_s = max_latency_s
        self._on_batch = on_batch
        self._on_wait = on_wait
        self._kv_capacity = kv_capacity  # tokens; None = no budget (batches are not split for it)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a batch was taken off the queue and is not finished yet

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lockgate-micro-batcher")

    def swap_model(self, model: LoadedModel) -> None:
        """Serve later batches with ``model``; a batch already running finishes on the old one."""
        self._model = model

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def idle(self) -> bool:
        return self._queue.empty() and not self._busy

    async def drain_and_stop(self, poll_s: float = 0.02) -> None:
        """Finish every queued and running request, then stop (used when a new version takes over)."""
        while not self.idle:
            await asyncio.sleep(poll_s)
        await self.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def queued(self) -> int:
        """Requests waiting for a batch to start."""
        return self._queue.qsize()

    async def submit(self, req: GenerateRequest, timings: PhaseTimings | None = None) -> Generation:
        """Queue ``req`` and wait for its generation (exceptions of the model are re-raised here).
        ``timings.queue`` gets the wait for the batch, ``timings.generate_started`` its start."""
        if not self.alive:
            raise RuntimeError("micro-batcher is not running")
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(req, future, timings))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            self._busy = True
            try:
                for group in _group(batch):
                    for chunk in fit_padded_kv(group, self._kv_capacity()):
                        await self._run_group(chunk)
            finally:
                self._busy = False

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self._max_latency_s
        while len(batch) < self._max_batch_size:
            try:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run_group(self, group: list[_Pending]) -> None:
        live = [p for p in group if not p.future.done()]  # done = cancelled (client gone, timeout)
        if not live:
            return
        self._on_batch(len(live))
        started = time.perf_counter()
        for p in live:
            self._on_wait(started - p.enqueued)
            if p.timings is not None:
                p.timings.queue += started - p.enqueued
                p.timings.generate_started = started
        first = live[0].request
        model = self._model  # captured: a hot swap during this batch affects only later batches
        try:
            results = await asyncio.to_thread(
                model.generate,
                [p.request.prompt for p in live],
                [p.request.max_new_tokens for p in live],
                temperature=first.temperature,
                top_p=first.top_p,
                seed=first.seed,
                stop=list(first.stop),
            )
        except Exception as exc:  # handed to every waiting request, which answers 500
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)


def fit_padded_kv(group: list[_Pending], capacity_tokens: int | None) -> list[list[_Pending]]:
    """Split a group so that no ``generate`` call's padded KV cache exceeds the capacity.

    Left padding makes every row as long as the longest prompt, and a row that stopped early keeps its
    cache until the whole call ends, so one call holds rows x (longest prompt + largest budget) tokens,
    which can exceed what its requests reserved one by one. Only one model call runs at a time (the
    runtime's forward lock), so each call alone must fit. Requests are taken shortest prompt first,
    so similar lengths share a call and padding stays small."""
    if capacity_tokens is None or any(p.request.prompt_tokens is None for p in group):
        return [group]
    chunks: list[list[_Pending]] = []
    current: list[_Pending] = []
    for pending in sorted(group, key=lambda p: p.request.prompt_tokens or 0):
        trial = [*current, pending]
        if current and _padded_tokens(trial) > capacity_tokens:
            chunks.append(current)
            trial = [pending]
        current = trial
    return [*chunks, current] if current else chunks


def _padded_tokens(rows: list[_Pending]) -> int:
    longest = max(p.request.prompt_tokens or 0 for p in rows)
    return len(rows) * (longest + max(p.request.max_new_tokens for p in rows))


def _group(batch: list[_Pending]) -> list[list[_Pending]]:
    groups: dict[object, list[_Pending]] = {}
    for i, pending in enumerate(batch):
        key = batch_key(pending.request)
        groups.setdefault(key if key is not None else ("alone", i), []).append(pending)
    return list(groups.values())


# -- the served model and following the registry --------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One loaded model version with its batcher and engine. Replaced as a whole on a hot swap, so a
    request that was admitted keeps the version it started with until it finishes."""

    model: LoadedModel
    batcher: MicroBatcher
    version: str
    engine: ContinuousEngine | None = None  # None: engine "static", or the engine failed to start


@dataclass(frozen=True)
class LoadedVersion:
    """A version loaded and warmed up, not yet served."""

    version: str
    model: LoadedModel
    budget: KVBudget
    engine: ContinuousEngine | None


def _cached_answer(gen: Generation) -> CachedAnswer:
    return CachedAnswer(gen.text, gen.prompt_tokens, gen.output_tokens, gen.finish_reason, gen.confidence)


def _workers_alive(served: Served) -> bool:
    return served.batcher.alive and (served.engine is None or served.engine.alive)


async def _generate(served: Served, req: GenerateRequest, timings: PhaseTimings) -> Generation:
    """Greedy requests on the continuous-batching engine when there is one; the rest micro-batched."""
    engine = served.engine
    if engine is None or not engine.accepts(req.temperature):
        return await served.batcher.submit(req, timings)
    timings.generate_started = time.perf_counter()
    return await engine.generate(req.prompt, req.max_new_tokens, req.stop)


def follows_registry(uri: str | None) -> bool:
    """A stage or alias URI floats: the version it names changes with registry transitions."""
    if not uri or not uri.startswith("models:/"):
        return False
    tail = uri.removeprefix("models:/")
    return "@" in tail or not tail.rsplit("/", 1)[-1].isdigit()


def registry_poll_seconds(env: Mapping[str, str] = os.environ) -> float:
    """How often a floating URI is re-resolved (``LOCKGATE_REGISTRY_POLL_S``, default 2 s): a stage
    transition is served within about one poll plus the new version's load and warm-up."""
    value = float(env.get("LOCKGATE_REGISTRY_POLL_S", "2"))
    if not 0.1 <= value <= 3600:
        raise ValueError(f"LOCKGATE_REGISTRY_POLL_S must be between 0.1 and 3600, got {value}")
    return value


# -- the service ---------------------------------------------------------------------------------


def _resources(config: ServiceConfig) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if config.gpu > 0:
        resources["gpu"] = config.gpu
    if config.cpu is not None:
        resources["cpu"] = config.cpu
    if config.memory is not None:
        resources["memory"] = config.memory
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
    if not request_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_logger.addHandler(handler)
        request_logger.propagate = False


@bentoml.service(
    resources=_resources(SETTINGS.config),
    traffic={"timeout": SETTINGS.config.timeout_s, "concurrency": SETTINGS.config.concurrency},
    workers=1,
)
class LLMService:
    """Serves one model version; see the module docstring for configuration and endpoints."""

    def __init__(self) -> None:
        _enable_loggers()
        if SETTINGS.model_uri is None:
            raise RuntimeError("LOCKGATE_MODEL_URI is not set: nothing to serve")
        self.settings = SETTINGS
        self.accounting = ACCOUNTING
        _ = self.accounting.metrics  # register the metrics now, so /metrics lists them before traffic
        self.served: Served | None = None
        self.load_error: BaseException | None = None
        self._ready = False
        self._background: list[asyncio.Task[None]] = []
        self.response_cache = build_cache(self.settings.config.response_cache)
        self.kv_budget: KVBudget | None = None  # set when a model is loaded (its shape decides it)
        self.admission: KVAdmission | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self.served.model if self.served else None

    @bentoml.on_startup
    async def start_loading(self) -> None:
        """Load and warm up in the background: /livez answers at once, /readyz once warm."""
        self._background.append(asyncio.create_task(self._start(), name="lockgate-model-loader"))

    @bentoml.on_shutdown
    async def shut_down(self) -> None:
        for task in self._background:
            task.cancel()
        if self.served is not None:
            await self.served.batcher.stop()
            if self.served.engine is not None:
                await asyncio.to_thread(self.served.engine.stop)
        if self.accounting.request_log is not None:
            self.accounting.request_log.close()
        if self.accounting.tracer is not None:
            await asyncio.to_thread(self.accounting.tracer.shutdown)

    async def __is_ready__(self) -> bool:
        return self._ready and self.served is not None and _workers_alive(self.served)

    async def __is_alive__(self) -> bool:
        # A model that failed to load, or a dead batch worker, never recovers: let the platform restart.
        if self.load_error is not None:
            return False
        return not (self._ready and self.served is not None and not _workers_alive(self.served))

    async def _start(self) -> None:
        try:
            loaded = await self._load(self.settings.model_uri or "")
        except Exception as exc:
            # Kept, not re-raised into a task nobody awaits: it surfaces as /livez 503 (restart me),
            # /readyz 503 and in the 503 body of every request.
            self.load_error = exc
            logger.exception("model %s failed to load", self.settings.model_uri)
            return
        self._swap_in(loaded)
        self._ready = True
        if follows_registry(self.settings.model_uri):
            self._background.append(asyncio.create_task(self._follow_registry(), name="lockgate-registry"))

    async def _load(self, uri: str) -> LoadedVersion:
        """Resolve, load, plan the KV cache for, start the engine of and warm up ``uri``."""
        from bentos.model_resolver import pin_version
        from bentos.runtime import load_model

        cfg = self.settings.config
        started = time.perf_counter()
        version = self.settings.model_version
        temperature = 1.0
        if uri.startswith("models:/"):
            # Pin first: the label is the registry version, and a floating URI is read only once.
            pinned = await asyncio.to_thread(pin_version, uri)
            version, uri = pinned.version, f"models:/{pinned.name}/{pinned.version}"
            temperature = pinned.calibration_temperature
        folder = await asyncio.to_thread(resolve_model_dir, uri)
        model = await asyncio.to_thread(load_model, folder)
        model.calibration_temperature = temperature
        loaded = time.perf_counter()
        # The first calls pay one-time costs (allocator, kernel selection): on the tiny test model
        # the first generate took 1.1 s vs 0.1 s afterwards (quanto: 2.4 s). Pay before traffic.
        for _ in range(cfg.warmup_requests):
            await asyncio.to_thread(model.generate, [WARMUP_PROMPT], min(8, cfg.max_new_tokens))
        budget = self._kv_plan(model)
        engine = await self._start_engine(model, budget)
        logger.info(
            "loaded %s v%s (%s, quantization=%s, device=%s) in %.1fs, %d warm-up runs in %.1fs",
            self.settings.model_name,
            version,
            self.settings.role,
            model.quantization,
            model.device,
            loaded - started,
            cfg.warmup_requests,
            time.perf_counter() - loaded,
        )
        return LoadedVersion(version, model, budget, engine)

    async def _start_engine(self, model: LoadedModel, budget: KVBudget) -> ContinuousEngine | None:
        """Start and warm up the continuous-batching engine (engine ``continuous``). If it cannot run
        this model, the error is logged with its traceback, ``/capacity`` shows ``engine: static`` and
        every request goes through the micro-batcher: slower under load, but served."""
        from bentos.continuous import ContinuousEngine, engine_shape

        cfg = self.settings.config
        if cfg.engine != "continuous":
            return None
        shape = engine_shape(
            cfg.max_batch_size, budget.capacity_tokens, budget.max_context_tokens, cfg.max_step_tokens
        )
        engine = ContinuousEngine(model, shape, on_join=self.accounting.metrics.batch_size.observe)
        try:
            await asyncio.to_thread(engine.start)
            for _ in range(cfg.warmup_requests):
                await engine.generate(WARMUP_PROMPT, min(8, cfg.max_new_tokens), ())
        except Exception:
            logger.exception("continuous batching failed to start; serving with whole-request batching")
            await asyncio.to_thread(engine.stop)
            return None
        return engine

    def _swap_in(self, loaded: LoadedVersion) -> None:
        """Make ``model`` the served one. One batcher lives for the whole process: on a hot swap it
        runs later batches on the new model while a running batch finishes on the old one, which is
        then released (nothing references it any more)."""
        cfg = self.settings.config
        version, model = loaded.version, loaded.model
        old = self.served
        if old is None:
            metrics = self.accounting.metrics
            batcher = MicroBatcher(
                model,
                cfg.max_batch_size,
                cfg.max_latency_ms / 1000.0,
                metrics.batch_size.observe,
                metrics.queue_wait.observe,
                kv_capacity=lambda: self.kv_budget.capacity_tokens if self.kv_budget else None,
            )
            batcher.start()
        else:
            batcher = old.batcher
            batcher.swap_model(model)
        self.served = Served(model, batcher, version, loaded.engine)
        self.accounting.serving_version = version
        self._apply_kv_budget(loaded.budget)
        if old is not None:
            logger.info("hot swap: now serving v%s (was v%s)", version, old.version)
            if old.engine is not None:
                # Its admitted requests finish on it; then its decode thread and cache go.
                self._background.append(asyncio.create_task(old.engine.drain_and_stop()))

    def _kv_plan(self, model: LoadedModel) -> KVBudget:
        """Size the KV-cache budget for ``model`` (after its weights are loaded, so free memory is what
        is really left, and before the engine allocates its cache from it)."""
        cfg = self.settings.config
        return plan_budget(
            model_kv_shape(model.model),
            cfg.kv_cache_budget_mb,
            free_memory_bytes(model.device),
            # Characters bound tokens from above for byte-level BPE tokenizers (a token is >= 1 char).
            cfg.max_prompt_chars + cfg.max_new_tokens,
        )

    def _apply_kv_budget(self, budget: KVBudget) -> None:
        """Admit requests against ``budget``. On a hot swap, reservations of requests still running
        stay counted."""
        cfg = self.settings.config
        shape = budget.shape
        if self.admission is None:
            self.admission = KVAdmission(budget.capacity_tokens, cfg.max_queue, on_change=self._note_load)
        else:
            self.admission.resize(budget.capacity_tokens)
        self.kv_budget = budget
        metrics = self.accounting.metrics
        metrics.kv_capacity.set(budget.capacity_tokens)
        metrics.kv_bytes_per_token.set(shape.bytes_per_token)
        logger.info(
            "KV cache: %d bytes/token (%d layers x %d kv heads x %d head dim x 2 x %d bytes); budget %.1f MB "
            "(%s) = %d tokens = %d requests of %d tokens; max_queue %d",
            shape.bytes_per_token, shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes,
            budget.budget_bytes / 1e6, budget.source, budget.capacity_tokens, budget.full_context_requests,
            budget.max_context_tokens, cfg.max_queue,
        )  # fmt: skip

    def _note_load(self) -> None:
        """Refresh the queue and KV gauges (called by the admission on every change)."""
        metrics = self.accounting.metrics
        waiting = self.admission.waiting if self.admission else 0
        batching = self.served.batcher.queued if self.served else 0
        metrics.queue_depth.set(waiting + batching)
        metrics.kv_used.set(self.admission.in_use if self.admission else 0)

    def capacity(self) -> dict[str, Any]:
        """The KV-cache plan and current load (GET /capacity)."""
        plan = self.kv_budget.as_dict() if self.kv_budget else {}
        admission = self.admission
        return {
            "ready": self._ready,
            "model_version": self.served.version if self.served else None,
            **plan,
            "reserved_tokens": admission.in_use if admission else 0,
            "running": admission.running if admission else 0,
            "waiting": admission.waiting if admission else 0,
            "max_queue": self.settings.config.max_queue,
            "engine": "continuous" if self.served and self.served.engine else "static",
        }

    async def _follow_registry(self) -> None:
        """Re-resolve the floating URI every poll; load and swap in a new version when it changes."""
        from bentos.model_resolver import pin_version

        uri = self.settings.model_uri or ""
        interval = registry_poll_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                pinned = await asyncio.to_thread(pin_version, uri)
                if self.served is not None and pinned.version != self.served.version:
                    self._swap_in(await self._load(f"models:/{pinned.name}/{pinned.version}"))
                elif self.served is not None:
                    # A recalibration re-tags the served version: apply it without reloading.
                    temperature = pinned.calibration_temperature
                    if temperature != self.served.model.calibration_temperature:
                        logger.info("calibration temperature of v%s now %.3f", pinned.version, temperature)
                        self.served.model.calibration_temperature = temperature
            except Exception:
                # A registry outage or a broken new version must not take down what is being served.
                logger.exception(
                    "following %s failed; still serving v%s", uri, self.served.version if self.served else "?"
                )

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
        record = _current_record("generate")
        body = GenerateInput.model_construct(
            prompt=prompt, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, user_id=user_id,
        )  # fmt: skip
        prepared = self._prepare(record, body)
        if isinstance(prepared, Refusal):
            return prepared.response(record)  # type: ignore[return-value]  # BentoML passes Responses through
        outcome = await self._run_unary(record, prepared)
        if isinstance(outcome, Refusal):
            return outcome.response(record)  # type: ignore[return-value]
        headers = {**prepared.headers, "Server-Timing": record.timings.server_timing()}
        return JSONResponse(outcome, headers=headers)  # type: ignore[return-value]

    @bentoml.api
    async def generate_batch(self, requests: list[Any]) -> dict[str, Any]:
        """Run a list of /generate bodies through the same batcher; answers in order.

        Each item is validated on its own: a bad item gets its own error (``status_code`` 400/422/503/500
        and ``field`` as ``requests.<i>.<field>``) and the others still run. Items are accounted one by
        one (request-log rows ``<batch request_id>-<i>``, metrics, cost)."""
        outer = _current_record("generate_batch")
        outer.claimed = True
        limit = self.settings.config.max_batch_items
        if not requests or len(requests) > limit:
            outer.reject(Problem("requests", f"must hold 1 to {limit} requests, got {len(requests)}"))
            return _json_error(outer, 422, outer.error or "", field="requests")  # type: ignore[return-value]
        outer.itemised = True
        results = await asyncio.gather(*(self._batch_item(outer, i, item) for i, item in enumerate(requests)))
        outer.status = "ok"
        return JSONResponse({"request_id": outer.request_id, "results": results})  # type: ignore[return-value]

    async def _batch_item(self, outer: RequestRecord, index: int, raw: Any) -> dict[str, Any]:
        record = RequestRecord(f"{outer.request_id}-{index}", "generate_batch", outer.started)
        record.customer = outer.customer
        record.timings.auth = outer.timings.auth
        prefix = f"requests.{index}"
        try:
            body = _validate_input(raw, prefix)
            prepared = body if isinstance(body, Refusal) else self._prepare(record, body, prefix)
            outcome = prepared if isinstance(prepared, Refusal) else await self._run_unary(record, prepared)
            if isinstance(outcome, Refusal):
                outcome.account(record)
                record.http_status = outcome.status
                return {"index": index, "status_code": outcome.status, **outcome.body(record)}
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
        record = _current_record("generate_stream")
        body = GenerateInput.model_construct(
            prompt=prompt, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, user_id=user_id,
        )  # fmt: skip
        prepared = self._prepare(record, body)
        if isinstance(prepared, Refusal):
            return prepared.response(record)  # type: ignore[return-value]
        started = await self.start_stream(record, prepared)
        if isinstance(started, Refusal):
            return started.response(record)  # type: ignore[return-value]
        stream = started
        chunks = iter(stream)
        try:
            first = await asyncio.to_thread(next, chunks, None)
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, Exception):
                return _server_error(record, exc)  # type: ignore[return-value]
            raise
        body_iter = _stream_body(stream, chunks, first, record, self.settings.log_text)
        media = "text/plain; charset=utf-8"
        return StreamingResponse(body_iter, media_type=media, headers=prepared.headers)  # type: ignore[return-value]

    # -- shared by the endpoints ---------------------------------------------------------------------

    def _prepare(self, record: RequestRecord, body: GenerateInput, prefix: str = "") -> Prepared | Refusal:
        """Check one request up to the point where it may wait for the model: prompt xor messages
        (400), limits and KV-cache fit (422), readiness (503). Counts its prompt tokens (tokenize)."""
        record.claimed = True
        started = time.perf_counter()
        at = f"{prefix}." if prefix else ""
        if (body.prompt is None) == (body.messages is None):
            if body.prompt is None:
                return Refusal(400, f"{at}prompt", "required: give prompt or chat messages")
            return Refusal(400, f"{at}messages", "give either prompt or messages, not both")
        served = self.served
        if not self._ready or served is None:
            failed = f"model failed to load: {self.load_error}"
            reason = failed if self.load_error else "model is not ready yet"
            # Described first so the row still has the prompt's length (as before chat existed).
            if body.prompt is not None:
                record.describe(_to_request(body, body.prompt, "prompt"), self.settings.log_text)
            return Refusal(503, None, reason)
        prompt, field_name = body.prompt, "prompt"
        if body.messages is not None:
            if not body.messages:
                return Refusal(422, f"{at}messages", "must hold at least one message")
            try:
                prompt, field_name = render_chat(served.model.tokenizer, body.messages), "messages"
            except ChatTemplateError as exc:
                return Refusal(422, f"{at}messages", str(exc))
        req = _to_request(body, prompt or "", field_name)
        record.describe(req, self.settings.log_text)
        problem = check_limits(req, self.settings.config)
        if problem is not None:
            return Refusal(422, f"{at}{problem.field}", problem.message)
        req, headers = _apply_flags(req)
        prompt_tokens = served.model.count_tokens(req.prompt)
        record.timings.tokenize = time.perf_counter() - started
        fit = self._kv_fit(req, prompt_tokens)
        if fit is not None:
            return Refusal(422, f"{at}{fit.field}", fit.message)
        return Prepared(
            replace(req, prompt_tokens=prompt_tokens), headers, prompt_tokens + req.max_new_tokens
        )

    def _kv_fit(self, req: GenerateRequest, prompt_tokens: int) -> Problem | None:
        """A request must fit the KV-cache capacity and the model's context on its own, or it could
        never run (queueing it would block everyone behind it)."""
        budget = self.kv_budget
        if budget is None:
            return None
        limit = min(budget.capacity_tokens, budget.max_context_tokens)
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

    async def _reserve(self, record: RequestRecord, tokens: int) -> Refusal | None:
        """Wait for KV-cache room (FIFO); the reservation is given back when the request ends."""
        admission = self.admission
        if admission is None:
            return None
        waited = time.perf_counter()
        try:
            await admission.acquire(tokens)
        except QueueFull as exc:
            return Refusal(503, None, str(exc), retry_after_s=exc.retry_after_s, queue_full=True)
        except ValueError as exc:  # a hot swap shrank the capacity below this request since _prepare
            return Refusal(422, "max_new_tokens", str(exc))
        finally:
            record.timings.queue += time.perf_counter() - waited
        held = time.perf_counter()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                admission.release(tokens, time.perf_counter() - held)

        record.cleanups.append(release)
        return None

    async def _run_unary(self, record: RequestRecord, prepared: Prepared) -> dict[str, Any] | Refusal:
        """Answer from the response cache, or reserve, batch, generate; the response body, or why not."""
        served = self.served
        assert served is not None
        key = self._cache_key(served, prepared.request)
        cache = self.response_cache
        hit = await asyncio.to_thread(cache.get, key) if key is not None and cache is not None else None
        self.accounting.metrics.count_cache(key, hit)
        if hit is not None:
            from bentos.runtime import Generation

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
        record.succeed(gen, self.settings.log_text)
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
        refused = await self._reserve(record, prepared.reserve_tokens)
        if refused is not None:
            return refused
        try:
            served = self.served  # after the wait: a hot swap meanwhile serves this on the new version
            assert served is not None
            record.model_version = served.version
            try:
                return served, await _generate(served, prepared.request, record.timings)
            except Exception as exc:
                logger.error("request %s failed", record.request_id, exc_info=exc)
                return Refusal(500, None, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            record.clean_up()  # the cache room is free once generation is done

    def _cache_key(self, served: Served, req: GenerateRequest) -> str | None:
        """The response-cache key of a deterministic (greedy) request; None when it is not cacheable."""
        if self.response_cache is None or req.temperature != 0.0:
            return None
        calibration = served.model.calibration_temperature
        return cache_key(served.version, calibration, req.prompt, req.max_new_tokens, req.stop)

    async def start_stream(self, record: RequestRecord, prepared: Prepared) -> TokenStream | Refusal:
        """Reserve KV-cache room and start streaming (for /generate_stream and the WebSocket)."""
        refused = await self._reserve(record, prepared.reserve_tokens)
        if refused is not None:
            return refused
        served = self.served
        assert served is not None
        record.model_version = served.version
        req = prepared.request
        if served.engine is not None and served.engine.accepts(req.temperature):
            stream: TokenStream = served.engine.stream(req.prompt, req.max_new_tokens, req.stop)
        else:
            stream = served.model.stream(
                req.prompt, req.max_new_tokens, req.temperature, req.top_p, req.seed, list(req.stop)
            )
        record.cleanups.append(stream.cancel)  # cleanups run last-in first: cancel, then release room
        return stream


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and may now wait for the model."""

    request: GenerateRequest
    headers: dict[str, str]  # feature flags applied
    reserve_tokens: int  # prompt + max_new_tokens: its worst-case KV-cache use


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no generation: 400/422 naming ``field``, 503 (not ready, or queue full with
    Retry-After), 500 (generation failed). One shape for the HTTP endpoints, batch items and WebSocket."""

    status: int
    field: str | None
    message: str
    retry_after_s: float | None = None
    queue_full: bool = False

    @property
    def text(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def account(self, record: RequestRecord) -> None:
        """Client faults and backpressure are refusals; not ready and failures count as errors."""
        if self.status < 500 or self.queue_full:
            record.status, record.error, record.error_field = "rejected", self.text, self.field
        else:
            record.fail(self.text)

    def body(self, record: RequestRecord) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.text, "request_id": record.request_id}
        if self.field is not None:
            body["field"] = self.field
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self, record: RequestRecord) -> JSONResponse:
        self.account(record)
        return JSONResponse(self.body(record), status_code=self.status, headers=self.headers())


def _to_request(body: GenerateInput, prompt: str, prompt_field: str) -> GenerateRequest:
    stop = tuple(body.stop or ())
    return GenerateRequest(
        prompt, body.max_new_tokens, body.temperature, body.top_p, body.seed, stop, body.user_id, prompt_field
    )


def _validate_input(raw: Any, field_path: str) -> GenerateInput | Refusal:
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


async def _stream_body(
    stream: TokenStream, chunks: Any, first: str | None, record: RequestRecord, log_text: bool
) -> AsyncIterator[str]:
    try:
        chunk = first
        while chunk is not None:
            yield chunk
            chunk = await asyncio.to_thread(next, chunks, None)
    except Exception as exc:
        logger.exception("stream %s failed after it started", record.request_id)
        record.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        # Non-blocking: a reader that went away must not keep the model busy (and locked).
        stream.cancel()
    if stream.generation is not None:
        record.succeed(stream.generation, log_text)


def _current_record(endpoint: Endpoint) -> RequestRecord:
    """The middleware's record of this request (a fresh one when called without the middleware)."""
    record = _CURRENT_RECORD.get()
    if record is None:
        record = RequestRecord(uuid.uuid4().hex, endpoint, time.perf_counter())
    return record


def _json_error(
    record: RequestRecord, status_code: int, message: str, field: str | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": record.request_id}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status_code)


def _server_error(record: RequestRecord, exc: Exception) -> JSONResponse:
    logger.error("request %s failed", record.request_id, exc_info=exc)
    record.fail(f"{type(exc).__name__}: {exc}")
    return _json_error(record, 500, f"generation failed: {type(exc).__name__}: {exc}")


LLMService.add_asgi_middleware(RequestAccounting, accounting=ACCOUNTING, keys=KEYS)
# /generate_ws and /capacity: a Starlette app BentoML routes to when none of its own routes match.
LLMService.mount_asgi_app(build_websocket_app(), path="/")

__all__ = [
    "ACCOUNTING",
    "SETTINGS",
    "Accounting",
    "GenerateInput",
    "GenerateRequest",
    "GenerateResponse",
    "LLMService",
    "MicroBatcher",
    "Problem",
    "RequestAccounting",
    "ServiceConfig",
    "ServiceSettings",
    "batch_key",
    "check_limits",
]
