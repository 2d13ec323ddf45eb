"""One served model version as requests see it, whichever engine runs it (:class:`Served`):
:class:`TransformersServed` (lockgate's loaded model, its micro-batcher and batching engine) or
:class:`VLLMServed` (one vLLM ``AsyncLLM`` owning weights, tokenizer and KV cache). bentos/model_host.py
chooses the engine (:class:`EngineChoice`), loads versions and swaps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lockgate.bentos.batching import MicroBatcher
from lockgate.bentos.protocol import GenerateRequest, PhaseTimings

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation, LoadedModel, TokenStream
    from lockgate.bentos.vllm_engine import VLLMEngine

EngineKind = Literal["vllm", "transformers"]


@dataclass(frozen=True)
class EngineChoice:
    """Which engine serves a version, and why (start-up log, ``/capacity``, the release summary)."""

    asked: str  # package.engine: auto, vllm or transformers
    kind: EngineKind
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"asked": self.asked, "engine": self.kind, "reason": self.reason}


class VersionRetired(RuntimeError):
    """The version a request was handed to is draining (a hot swap): retry on the one served now."""


class Engine(Protocol):
    """A batching engine in front of one loaded model version (beside the micro-batcher, which serves
    whatever an engine does not accept)."""

    @property
    def alive(self) -> bool: ...

    def accepts(self, temperature: float) -> bool: ...

    async def generate(self, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> Generation: ...

    def stream(self, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> TokenStream: ...

    async def drain_and_stop(self) -> None: ...

    def stop(self) -> None: ...


class Served(Protocol):
    """One model version as requests see it, whichever engine runs it."""

    version: str
    choice: EngineChoice

    @property
    def engine_name(self) -> str: ...  # what runs: vllm, continuous or static

    @property
    def workers_alive(self) -> bool: ...

    @property
    def tokenizer(self) -> Any: ...

    def count_tokens(self, text: str) -> int: ...

    @property
    def calibration_temperature(self) -> float: ...

    def set_calibration_temperature(self, temperature: float) -> None: ...

    @property
    def queued(self) -> int: ...

    async def generate(self, req: GenerateRequest, timings: PhaseTimings) -> Generation: ...

    def stream(self, req: GenerateRequest) -> TokenStream: ...

    def capacity(self) -> dict[str, Any]: ...


class TransformersServed:
    """A version loaded by lockgate (bentos/runtime.py) with its micro-batcher and batching engine."""

    def __init__(
        self,
        model: LoadedModel,
        batcher: MicroBatcher,
        version: str,
        engine: Engine | None,
        choice: EngineChoice,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.version = version
        self.engine = engine  # None: engine "static", or the engine failed to start
        self.choice = choice

    @property
    def engine_name(self) -> str:
        return "continuous" if self.engine is not None else "static"

    @property
    def workers_alive(self) -> bool:
        return self.batcher.alive and (self.engine is None or self.engine.alive)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    @property
    def calibration_temperature(self) -> float:
        return self.model.calibration_temperature

    def set_calibration_temperature(self, temperature: float) -> None:
        self.model.calibration_temperature = temperature

    @property
    def queued(self) -> int:
        return self.batcher.queued

    async def generate(self, req: GenerateRequest, timings: PhaseTimings) -> Generation:
        """Requests the engine accepts run there; the rest are micro-batched (the continuous engine has
        no penalty processor: penalized requests take the batcher, whose generate call has one)."""
        engine = self.engine
        if engine is None or not engine.accepts(req.temperature) or req.penalties:
            return await self.batcher.submit(req, timings)
        timings.generate_started = time.perf_counter()
        return await engine.generate(req.prompt, req.max_new_tokens, req.stop)

    def stream(self, req: GenerateRequest) -> TokenStream:
        if self.engine is not None and self.engine.accepts(req.temperature) and not req.penalties:
            return self.engine.stream(req.prompt, req.max_new_tokens, req.stop)
        return self.model.stream(
            req.prompt, req.max_new_tokens, req.temperature, req.top_p, req.seed, list(req.stop),
            req.presence_penalty, req.frequency_penalty,
        )  # fmt: skip

    def capacity(self) -> dict[str, Any]:
        return {}


class VLLMServed:
    """A version served by vLLM (bentos/vllm_engine.py): every request, greedy or sampling, goes to the
    engine with its own sampling parameters; vLLM batches them continuously."""

    def __init__(self, engine: VLLMEngine, choice: EngineChoice) -> None:
        self.engine = engine
        self.version = engine.version
        self.choice = choice

    engine_name = "vllm"

    @property
    def workers_alive(self) -> bool:
        return self.engine.alive

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    @property
    def calibration_temperature(self) -> float:
        return self.engine.calibration_temperature

    def set_calibration_temperature(self, temperature: float) -> None:
        self.engine.calibration_temperature = temperature

    @property
    def queued(self) -> int:
        return self.engine.metrics.waiting

    async def generate(self, req: GenerateRequest, timings: PhaseTimings) -> Generation:
        from lockgate.bentos.vllm_engine import EngineStopped

        timings.generate_started = time.perf_counter()
        try:
            return await self.engine.generate(req.prompt, req.max_new_tokens, _sampling(req))
        except EngineStopped as exc:
            raise VersionRetired(str(exc)) from exc

    def stream(self, req: GenerateRequest) -> TokenStream:
        from lockgate.bentos.vllm_engine import EngineStopped

        try:
            return self.engine.stream(req.prompt, req.max_new_tokens, _sampling(req))  # type: ignore[return-value]
        except EngineStopped as exc:
            raise VersionRetired(str(exc)) from exc

    def capacity(self) -> dict[str, Any]:
        return {"vllm": self.engine.capacity()}


def _sampling(req: GenerateRequest) -> Any:
    from lockgate.bentos.runtime import SamplingParams

    return SamplingParams(
        req.temperature, req.top_p, req.seed, req.stop, req.presence_penalty, req.frequency_penalty
    )
