"""The served model: loading, warm-up, KV-cache plan and admission, the generation engine, hot swaps and
following the registry. The one place that chooses the engine: ``package.engine`` (:func:`choose_engine`:
vllm or transformers, per loaded version) and, for transformers, ``package.batching.engine``
(:data:`ENGINES`: continuous or static).

A version is served as a whole (:class:`Served`): with transformers its model + micro-batcher + engine
(:class:`TransformersServed`), with vLLM one ``AsyncLLM`` that owns the weights, the tokenizer and the
KV cache (:class:`VLLMServed`; the weights are not also loaded into this process). A hot swap replaces
it, so a request that was admitted keeps the version it started with until it finishes; one that hits
a version already draining is retried on the version served now.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgate.bentos.batching import MicroBatcher
from lockgate.bentos.config import MODEL_URI_VARIABLE, ModelUri, ServiceEnv
from lockgate.bentos.kv_budget import (
    KVAdmission,
    KVBudget,
    KVShape,
    QueueFull,
    free_memory_bytes,
    kv_shape,
    model_kv_shape,
    plan_budget,
)
from lockgate.bentos.protocol import GenerateRequest, ModelView, PhaseTimings, Prepared, Refusal
from lockgate.bentos.served import (
    Engine,
    EngineChoice,
    Served,
    TransformersServed,
    VersionRetired,
    VLLMServed,
)

if TYPE_CHECKING:
    # Imported lazily at runtime: torch + transformers take seconds to import, and `bentoml build`
    # and the serve supervisor process import the service without ever generating.
    from lockgate.bentos.accounting import RequestRecord, ServiceMetrics
    from lockgate.bentos.runtime import Generation, LoadedModel, TokenStream

logger = logging.getLogger("lockgate.service")
WARMUP_PROMPT = "Warm-up: the quick brown fox jumps over the lazy dog."


def _freeze_heap() -> None:
    """Move every object alive now (torch, transformers, the loaded model) out of the cyclic garbage
    collector's reach. Loading a version allocates enough objects to trigger full collections, each of
    which walks the whole heap while holding the GIL: every thread and the event loop stop meanwhile
    (measured: answers stalled 1.4-1.7 s and /livez took 1-2 s after a hot swap). Reference counting
    still frees the old version; only cyclic garbage created before the freeze is kept."""
    gc.freeze()


def choose_engine(asked: str, folder: Path) -> EngineChoice:
    """``package.engine`` for the version in ``folder``: ``auto`` takes vLLM when it is installed here and
    can load the folder (bentos/vllm_fit.py ``unavailable_reason``), else transformers. ``vllm`` that
    cannot be served raises, naming the field."""
    if asked == "transformers":
        return EngineChoice(asked, "transformers", "package.engine: transformers")
    if asked not in ("auto", "vllm"):
        raise ValueError(f"package.engine: {asked!r} is not one of auto, vllm, transformers")
    # Imports torch (bentos/runtime.py), not vLLM: fine here, the version is about to be loaded anyway.
    from lockgate.bentos.vllm_fit import unavailable_reason

    reason = unavailable_reason(folder)
    if reason is None:
        return EngineChoice(asked, "vllm", f"package.engine: {asked}; vLLM is installed and can load it")
    if asked == "vllm":
        raise RuntimeError(f"package.engine: vllm cannot serve this version: {reason}")
    return EngineChoice(asked, "transformers", f"package.engine: auto; vLLM cannot serve it: {reason}")


# -- engines ----------------------------------------------------------------------------------------


# -- transformers engines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineContext:
    """What an engine factory gets: the model, its KV budget and the service's batching settings."""

    model: LoadedModel
    budget: KVBudget
    env: ServiceEnv
    on_join: Callable[[int], None]  # told how many requests run together when one joins


EngineFactory = Callable[[EngineContext], Awaitable["Engine | None"]]


async def _continuous(ctx: EngineContext) -> Engine | None:
    """Start and warm up the continuous-batching engine. If it cannot run this model, the error is
    logged with its traceback, ``/capacity`` shows ``engine: static`` and every request goes through
    the micro-batcher: slower under load, but served."""
    from lockgate.bentos.continuous import ContinuousEngine, engine_shape

    cfg = ctx.env.config
    shape = engine_shape(
        cfg.batching.max_batch_size,
        ctx.budget.capacity_tokens,
        ctx.budget.max_context_tokens,
        cfg.batching.max_step_tokens,
    )
    engine = ContinuousEngine(ctx.model, shape, on_join=ctx.on_join)
    try:
        await asyncio.to_thread(engine.start)
        for _ in range(cfg.warmup_requests):
            await engine.generate(WARMUP_PROMPT, min(8, cfg.limits.max_new_tokens), ())
    except Exception:
        logger.exception("continuous batching failed to start; serving with whole-request batching")
        await asyncio.to_thread(engine.stop)
        return None
    return engine


async def _static(ctx: EngineContext) -> Engine | None:
    """Whole requests only: the micro-batcher serves everything."""
    return None


#: ``package.batching.engine`` -> how that engine is started. A new engine is one entry here.
ENGINES: dict[str, EngineFactory] = {"continuous": _continuous, "static": _static}


def transformers_engine(name: str) -> EngineFactory:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"batching.engine: {name!r} is not one of {sorted(ENGINES)}") from None


@dataclass(frozen=True)
class LoadedVersion:
    """A version loaded and warmed up, not yet served."""

    version: str
    budget: KVBudget
    served: Served | _Pending


@dataclass(frozen=True)
class _Pending:
    """A transformers version loaded and warmed up, waiting for its micro-batcher (see _swap_in)."""

    model: LoadedModel
    engine: Engine | None
    version: str
    choice: EngineChoice
    engine_name: str = "transformers"


async def _stop(served: Served) -> None:
    if isinstance(served, VLLMServed):
        await asyncio.to_thread(served.engine.stop)
    elif isinstance(served, TransformersServed):
        await served.batcher.stop()
        if served.engine is not None:
            await asyncio.to_thread(served.engine.stop)


#: How many hot swaps in a row a request follows before it gives up (one is the normal case).
_HANDOVERS = 3


# -- the host ---------------------------------------------------------------------------------------


class ModelHost:
    """Owns what is served and the KV-cache admission in front of it."""

    def __init__(self, env: ServiceEnv, metrics: Callable[[], ServiceMetrics]) -> None:
        if env.model_uri is None:
            raise RuntimeError(f"{MODEL_URI_VARIABLE} is not set: nothing to serve")
        self.env = env
        self.uri: ModelUri = env.model_uri
        self._metrics = metrics
        self.served: Served | None = None
        self.load_error: BaseException | None = None
        self.ready = False
        self.kv_budget: KVBudget | None = None  # set when a model is loaded (its shape decides it)
        self.admission: KVAdmission | None = None
        self._engine = transformers_engine(env.config.batching.engine)
        self._retiring: list[Served] = []  # old versions still draining after a hot swap
        self._background: list[asyncio.Task[None]] = []
        self.on_version: Callable[[str], None] = lambda _version: None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load and warm up in the background: /livez answers at once, /readyz once warm."""
        self._background.append(asyncio.create_task(self._start(), name="lockgate-model-loader"))

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        # A vLLM engine is a process of its own: one still draining must be stopped too, not orphaned.
        for served in [*self._retiring, *([self.served] if self.served is not None else [])]:
            await _stop(served)

    @property
    def is_ready(self) -> bool:
        return self.ready and self.served is not None and self.served.workers_alive

    @property
    def is_alive(self) -> bool:
        # A model that failed to load, or a dead batch worker, never recovers: let the platform restart.
        if self.load_error is not None:
            return False
        return not (self.ready and self.served is not None and not self.served.workers_alive)

    @property
    def not_ready_reason(self) -> str:
        return f"model failed to load: {self.load_error}" if self.load_error else "model is not ready yet"

    def view(self) -> ModelView | None:
        """What request preparation needs of the served model; None while nothing is ready."""
        served = self.served
        if not self.ready or served is None:
            return None
        budget = self.kv_budget
        limit = None if budget is None else min(budget.capacity_tokens, budget.max_context_tokens)
        return ModelView(served.tokenizer, served.count_tokens, limit)

    async def _start(self) -> None:
        try:
            loaded = await self._load(self.uri)
        except Exception as exc:
            # Kept, not re-raised into a task nobody awaits: it surfaces as /livez 503 (restart me),
            # /readyz 503 and in the 503 body of every request.
            self.load_error = exc
            logger.exception("model %s failed to load", self.uri)
            return
        self._swap_in(loaded)
        _freeze_heap()
        self.ready = True
        if self.uri.floats:
            self._background.append(asyncio.create_task(self._follow_registry(), name="lockgate-registry"))

    # -- loading ------------------------------------------------------------------------------------

    async def _load(self, uri: ModelUri) -> LoadedVersion:
        """Resolve ``uri``, choose its engine, load it, plan its KV cache and warm it up."""
        from lockgate.bentos.model_resolver import pin_version, resolve_model_dir

        started = time.perf_counter()
        version = self.env.label_version
        temperature = 1.0
        if uri.is_registry:
            # Pin first: the label is the registry version, and a floating URI is read only once.
            pinned = await asyncio.to_thread(pin_version, uri)
            version, uri = pinned.version, uri.pinned(pinned.version)
            temperature = pinned.calibration_temperature
        folder = await asyncio.to_thread(resolve_model_dir, uri, self.env.model_cache)
        choice = await asyncio.to_thread(choose_engine, self.env.config.engine, folder)
        logger.info("engine for v%s: %s (%s)", version, choice.kind, choice.reason)
        if choice.kind == "vllm":
            loaded = await self._load_vllm(folder, version, temperature, choice)
        else:
            loaded = await self._load_transformers(folder, version, temperature, choice)
        logger.info(
            "loaded %s v%s (%s, engine %s) and warmed up in %.1fs",
            self.env.label_name, version, self.env.role, loaded.served.engine_name,
            time.perf_counter() - started,
        )  # fmt: skip
        return loaded

    async def _load_transformers(
        self, folder: Path, version: str, temperature: float, choice: EngineChoice
    ) -> LoadedVersion:
        from lockgate.bentos.runtime import load_model

        cfg = self.env.config
        started = time.perf_counter()
        model = await asyncio.to_thread(load_model, folder)
        model.calibration_temperature = temperature
        loaded = time.perf_counter()
        # The first calls pay one-time costs (allocator, kernel selection): on the tiny test model
        # the first generate took 1.1 s vs 0.1 s afterwards (quanto: 2.4 s). Pay before traffic.
        for _ in range(cfg.warmup_requests):
            await asyncio.to_thread(model.generate, [WARMUP_PROMPT], min(8, cfg.limits.max_new_tokens))
        budget = self._kv_plan(model_kv_shape(model.model), model.device)
        engine = await self._engine(
            EngineContext(model, budget, self.env, self._metrics().batch_size.observe)
        )
        logger.info(
            "transformers v%s: quantization=%s, device=%s, loaded in %.1fs, %d warm-up runs in %.1fs",
            version, model.quantization, model.device, loaded - started, cfg.warmup_requests,
            time.perf_counter() - loaded,
        )  # fmt: skip
        # The micro-batcher is attached by _swap_in (one lives as long as transformers versions follow).
        return LoadedVersion(version, budget, _Pending(model, engine, version, choice))

    async def _load_vllm(
        self, folder: Path, version: str, temperature: float, choice: EngineChoice
    ) -> LoadedVersion:
        """Start vLLM's engine on ``folder`` (it loads the weights, in its own process: they are not also
        loaded here). Its cache is the spec's KV budget; admission then counts in vLLM's real blocks."""
        from transformers import AutoConfig

        from lockgate.bentos.model_resolver import default_cache_dir
        from lockgate.bentos.runtime import detect_quantization
        from lockgate.bentos.vllm_engine import VLLMEngine, VLLMEngineConfig, checkpoint_dtype

        cfg = self.env.config
        if detect_quantization(folder) == "lockgate":
            # lockgate's own INT8/INT4 format, as the compressed-tensors checkpoint vLLM loads (same codes
            # and scales, no requantization; exported once per candidate into the model cache).
            from lockgate.bentos.compressed_export import export_cached

            cache = self.env.model_cache or default_cache_dir()
            folder = await asyncio.to_thread(export_cached, folder, cache / "compressed-tensors")
            logger.info(
                "v%s: lockgate-quantized weights served by vLLM as compressed-tensors: %s", version, folder
            )
        hf_config = await asyncio.to_thread(AutoConfig.from_pretrained, str(folder))
        import torch

        dtype_bytes = torch.empty((), dtype=getattr(torch, checkpoint_dtype(folder))).element_size()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        budget = self._kv_plan(kv_shape(hf_config, dtype_bytes), device)
        text_config = getattr(hf_config, "text_config", None) or hf_config
        positions = int(getattr(text_config, "max_position_embeddings", budget.max_context_tokens))
        # vLLM refuses a max_model_len its cache cannot hold once; keep a block's margin for rounding.
        fits = max(32, budget.capacity_tokens - 128)
        engine_config = VLLMEngineConfig(
            model_dir=folder,
            version=version,
            kv_cache_bytes=budget.budget_bytes,
            max_model_len=min(budget.max_context_tokens, fits, positions),
            max_num_seqs=cfg.batching.max_batch_size,
            enforce_eager=cfg.vllm.enforce_eager,
            cpu_reserved_cores=cfg.vllm.cpu_reserved_cores,
            calibration_temperature=temperature,
        )
        engine = await VLLMEngine.start(engine_config)
        try:
            for _ in range(cfg.warmup_requests):
                await engine.generate(WARMUP_PROMPT, min(8, cfg.limits.max_new_tokens))
        except BaseException:
            await asyncio.to_thread(engine.stop)
            raise
        # Admission counts what vLLM really allocated (whole blocks), and no request beyond its length.
        budget = replace(
            budget,
            budget_bytes=engine.capacity_tokens * budget.shape.bytes_per_token,
            source=f"{budget.source}, as vLLM blocks",
            max_context_tokens=engine_config.max_model_len,
        )
        return LoadedVersion(version, budget, VLLMServed(engine, choice))

    def _swap_in(self, loaded: LoadedVersion) -> None:
        """Serve ``loaded``. One micro-batcher serves consecutive transformers versions: on a hot swap it
        runs later batches on the new model while a running batch finishes on the old one. The old
        version's engine (or a micro-batcher no longer needed) drains, then stops."""
        old = self.served
        served = loaded.served
        if isinstance(served, _Pending):
            if isinstance(old, TransformersServed):
                batcher = old.batcher
                batcher.swap_model(served.model)
            else:
                batcher = self._new_batcher(served.model)
            served = TransformersServed(served.model, batcher, served.version, served.engine, served.choice)
        self.served = served
        self.on_version(loaded.version)
        self._apply_kv_budget(loaded.budget)
        if old is not None:
            logger.info(
                "hot swap: now serving v%s on %s (was v%s on %s)",
                loaded.version, served.engine_name, old.version, old.engine_name,
            )  # fmt: skip
            self._retiring.append(old)
            self._background.append(asyncio.create_task(self._retire(old, served)))

    def _new_batcher(self, model: LoadedModel) -> MicroBatcher:
        batching = self.env.config.batching
        metrics = self._metrics()
        batcher = MicroBatcher(
            model,
            batching.max_batch_size,
            batching.max_latency_ms / 1000.0,
            metrics.batch_size.observe,
            metrics.queue_wait.observe,
            kv_capacity=lambda: self.kv_budget.capacity_tokens if self.kv_budget else None,
        )
        batcher.start()
        return batcher

    async def _retire(self, old: Served, new: Served) -> None:
        """Let ``old``'s admitted requests finish on it, then free its engine (and cache)."""
        try:
            if isinstance(old, VLLMServed):
                await old.engine.drain(timeout_s=float(self.env.config.limits.timeout_s))
            elif isinstance(old, TransformersServed):
                if old.engine is not None:
                    await old.engine.drain_and_stop()
                if not (isinstance(new, TransformersServed) and new.batcher is old.batcher):
                    await old.batcher.drain_and_stop()
        finally:
            self._retiring.remove(old)

    async def generate(self, req: GenerateRequest, timings: PhaseTimings) -> tuple[Served, Generation]:
        """Generate on the version served now; one that began draining meanwhile hands over to the new."""
        for _ in range(_HANDOVERS):
            served = self.served
            assert served is not None
            try:
                return served, await served.generate(req, timings)
            except VersionRetired:
                if self.served is served:
                    raise
                logger.info("v%s is draining: request retried on v%s", served.version, self.served.version)
        raise VersionRetired(f"no version took the request after {_HANDOVERS} hot swaps")

    # -- the KV cache -------------------------------------------------------------------------------

    def _kv_plan(self, shape: KVShape, device: str) -> KVBudget:
        """Size the KV-cache budget for a model of ``shape`` (after transformers loaded its weights, so
        free memory is what is really left; vLLM loads its weights in its own process, after this)."""
        cfg = self.env.config
        return plan_budget(
            shape,
            cfg.capacity.kv_cache_budget_mb,
            free_memory_bytes(device),
            # Characters bound tokens from above for byte-level BPE tokenizers (a token is >= 1 char).
            cfg.limits.max_prompt_chars + cfg.limits.max_new_tokens,
        )

    def _apply_kv_budget(self, budget: KVBudget) -> None:
        """Admit requests against ``budget``. On a hot swap, reservations of requests still running
        stay counted."""
        max_queue = self.env.config.capacity.max_queue
        shape = budget.shape
        if self.admission is None:
            self.admission = KVAdmission(budget.capacity_tokens, max_queue, on_change=self._note_load)
        else:
            self.admission.resize(budget.capacity_tokens)
        self.kv_budget = budget
        metrics = self._metrics()
        metrics.kv_capacity.set(budget.capacity_tokens)
        metrics.kv_bytes_per_token.set(shape.bytes_per_token)
        logger.info(
            "KV cache: %d bytes/token (%d layers x %d kv heads x %d head dim x 2 x %d bytes); budget %.1f MB "
            "(%s) = %d tokens = %d requests of %d tokens; max_queue %d",
            shape.bytes_per_token, shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes,
            budget.budget_bytes / 1e6, budget.source, budget.capacity_tokens, budget.full_context_requests,
            budget.max_context_tokens, max_queue,
        )  # fmt: skip

    def _note_load(self) -> None:
        """Refresh the queue and KV gauges (called by the admission on every change)."""
        metrics = self._metrics()
        waiting = self.admission.waiting if self.admission else 0
        batching = self.served.queued if self.served else 0
        metrics.queue_depth.set(waiting + batching)
        metrics.kv_used.set(self.admission.in_use if self.admission else 0)

    async def reserve(self, record: RequestRecord, tokens: int) -> Refusal | None:
        """Wait for KV-cache room (FIFO); the reservation is given back when the request ends."""
        admission = self.admission
        if admission is None:
            return None
        waited = time.perf_counter()
        try:
            await admission.acquire(tokens)
        except QueueFull as exc:
            return Refusal(503, None, str(exc), retry_after_s=exc.retry_after_s, queue_full=True)
        except ValueError as exc:  # a hot swap shrank the capacity below this request since prepare
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

    async def start_stream(self, record: RequestRecord, prepared: Prepared) -> TokenStream | Refusal:
        """Reserve KV-cache room and start streaming (for /generate_stream and the WebSocket)."""
        refused = await self.reserve(record, prepared.reserve_tokens)
        if refused is not None:
            return refused
        for _ in range(_HANDOVERS):
            served = self.served
            assert served is not None
            try:
                stream = served.stream(prepared.request)
                break
            except VersionRetired:
                if self.served is served:
                    raise
        else:
            raise VersionRetired(f"no version took the stream after {_HANDOVERS} hot swaps")
        record.model_version = served.version
        record.cleanups.append(stream.cancel)  # cleanups run last-in first: cancel, then release room
        return stream

    def capacity(self) -> dict[str, Any]:
        """The KV-cache plan and current load (GET /capacity)."""
        plan = self.kv_budget.as_dict() if self.kv_budget else {}
        admission = self.admission
        return {
            "ready": self.ready,
            "model_version": self.served.version if self.served else None,
            **plan,
            "reserved_tokens": admission.in_use if admission else 0,
            "running": admission.running if admission else 0,
            "waiting": admission.waiting if admission else 0,
            "max_queue": self.env.config.capacity.max_queue,
            # What runs: vllm, continuous, or static (asked for, or the continuous engine failed to start).
            "engine": self.served.engine_name if self.served else None,
            "engine_choice": self.served.choice.as_dict() if self.served else None,
            **(self.served.capacity() if self.served else {}),
        }

    # -- following the registry ---------------------------------------------------------------------

    async def _follow_registry(self) -> None:
        """Re-resolve the floating URI every poll; load and swap in a new version when it changes."""
        from lockgate.bentos.model_resolver import pin_version

        while True:
            await asyncio.sleep(self.env.registry_poll_s)
            try:
                pinned = await asyncio.to_thread(pin_version, self.uri)
                if self.served is not None and pinned.version != self.served.version:
                    self._swap_in(await self._load(self.uri.pinned(pinned.version)))
                    _freeze_heap()
                elif self.served is not None:
                    # A recalibration re-tags the served version: apply it without reloading.
                    temperature = pinned.calibration_temperature
                    if temperature != self.served.calibration_temperature:
                        logger.info("calibration temperature of v%s now %.3f", pinned.version, temperature)
                        self.served.set_calibration_temperature(temperature)
            except Exception:
                # A registry outage or a broken new version must not take down what is being served.
                logger.exception(
                    "following %s failed; still serving v%s",
                    self.uri,
                    self.served.version if self.served else "?",
                )
