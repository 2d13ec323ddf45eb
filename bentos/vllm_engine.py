"""The ``vllm`` serving engine: vLLM's async engine (``AsyncLLM``) in the service's process, one per
served model version.

vLLM schedules requests continuously over a paged KV cache (prefix caching on), honours every
request's own sampling parameters (temperature, top_p, seed, stop) inside one batch, and streams
detokenized text. lockgate keeps what is its own on top: the KV budget from the spec (mapped here to
vLLM's cache size), admission and 503 backpressure, accounting, first-token confidence for
calibration, and the drain of an old version on a hot swap.

Only the serving environment has vLLM (``make serve-env``: its pins conflict with the control
plane's). Nothing imports this module unless the engine ``vllm`` was chosen, and it imports vLLM
itself only in :meth:`VLLMEngine.start`; ``bentos/vllm_fit.py`` says why vLLM cannot serve a folder
without paying for vLLM's import.

Contract (shared with the transformers engine): ``admit`` counts a request in before its first await
(a drain waits for it); ``generate`` answers one request; ``stream`` starts one streamed request
(iterate it, asynchronously or from a worker thread, ``cancel()`` aborts it in vLLM); ``drain``
lets admitted requests finish, then shuts the engine down; ``capacity`` says how big it is;
``version`` names the model version it serves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgate.bentos.runtime import (
    FinishReason,
    Generation,
    SamplingParams,
    calibrated,
)
from lockgate.bentos.vllm_metrics import EngineMetrics, stat_logger_factory

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


GREEDY = SamplingParams()

#: Prompts whose token ids are kept: a request is tokenized when it is checked (limits, KV fit) and its
#: ids are sent to vLLM moments later, maybe after other requests were checked in between.
ENCODED_KEEP = 64


class EngineStopped(RuntimeError):
    """The engine is draining or stopped: the request must go to the version served now."""


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How one version's engine is built. ``kv_cache_bytes`` is the KV budget already resolved by
    bentos/kv_budget.py (configured ``kv_cache_budget_mb`` or a share of free memory): vLLM's own
    default on CPU (a fraction of *total* memory) does not fit a machine shared with other processes."""

    model_dir: Path
    version: str
    kv_cache_bytes: int
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    #: None: the checkpoint's own dtype (config.json), as the transformers engine loads it. vLLM's
    #: "auto" would run a float32 checkpoint in bfloat16, and give other answers than transformers.
    dtype: str | None = None
    #: Eager mode skips torch.compile: start-up on 2 CPU cores goes from minutes to well under one.
    enforce_eager: bool = True
    #: CPU build: cores kept from the model's OpenMP threads (None: see :func:`cpu_thread_env`).
    cpu_reserved_cores: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    #: Temperature scaling of the first-token confidence (fitted on feedback by the monitor).
    calibration_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes: must be > 0, got {self.kv_cache_bytes}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json declares (``dtype``, or ``torch_dtype`` before transformers 5)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype)


#: Hosts this small get every core for the model's threads: vLLM's CPU build reserves one core for
#: its API process and engine core, which is half of a 2-core host.
SMALL_HOST_CORES = 2


def cpu_thread_env(reserved: int | None, cores: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM's CPU worker reads its thread binding from (empty: leave vLLM's default).

    An operator's own ``VLLM_CPU_NUM_OF_RESERVED_CPU`` wins over both the spec and the default."""
    environ = dict(os.environ) if environ is None else environ
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in environ:
        return {}
    if reserved is None:
        if cores > SMALL_HOST_CORES:
            return {}  # vLLM's own default
        reserved = 0
    if reserved >= cores:
        raise ValueError(
            f"vllm.cpu_reserved_cores: {reserved} leaves none of this host's {cores} cores for the model"
        )
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


def engine_args(config: VLLMEngineConfig) -> Any:
    """vLLM's ``AsyncEngineArgs`` for ``config`` (imports vLLM)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(config.model_dir),
        tokenizer=str(config.model_dir),
        served_model_name=[config.version],
        dtype=config.dtype or checkpoint_dtype(config.model_dir),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        kv_cache_memory_bytes=config.kv_cache_bytes,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        # The first token's log-probability is the response's confidence; raw = before temperature
        # and top_p, as the transformers engine computes it.
        max_logprobs=1,
        logprobs_mode="raw_logprobs",
        # Engine stats go to EngineMetrics (bentos/vllm_metrics.py), not to vLLM's 10-second log lines.
        disable_log_stats=True,
        enable_log_requests=False,
    )


class VLLMEngine:
    """One model version served by vLLM's ``AsyncLLM``. Create with :meth:`start`; use from one event
    loop (the one it was started on)."""

    def __init__(self, config: VLLMEngineConfig, llm: AsyncLLM, metrics: EngineMetrics) -> None:
        self.config = config
        self._llm = llm
        self.metrics = metrics
        self._tokenizer = llm.get_tokenizer()
        self.calibration_temperature = config.calibration_temperature  # re-tagged live by a recalibration
        cache = llm.vllm_config.cache_config
        self.blocks = int(cache.num_gpu_blocks or 0)
        self.block_size = int(cache.block_size)
        self._ids = itertools.count()
        self._encoded: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._in_flight = 0
        self._draining = False
        self._stopped = False
        self.started_s = 0.0

    @classmethod
    async def start(cls, config: VLLMEngineConfig) -> VLLMEngine:
        """Build the engine (loads the weights in vLLM's engine-core process and allocates the KV cache;
        minutes on 2 CPU cores). Runs in a worker thread so a served version keeps answering meanwhile."""
        started = time.perf_counter()
        # vLLM's engine core and CPU worker are processes: forking BentoML's threaded worker can copy a
        # held lock into them, spawn starts them clean (an operator's own setting wins).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # Read by the engine core when it binds the model's OpenMP threads (a process this one spawns).
        threads = cpu_thread_env(config.cpu_reserved_cores, len(os.sched_getaffinity(0)))
        os.environ.update(threads)

        def build() -> AsyncLLM:
            from vllm.v1.engine.async_llm import AsyncLLM

            return AsyncLLM.from_engine_args(engine_args(config), stat_loggers=[stat_logger_factory(metrics)])

        metrics = EngineMetrics(config.version)
        llm = await asyncio.to_thread(build)
        engine = cls(config, llm, metrics)
        engine.started_s = time.perf_counter() - started
        logger.info(
            "vllm engine v%s: %s, %d KV blocks x %d tokens = %d tokens (%.1f MB), max_model_len %d, "
            "max_num_seqs %d, eager %s, prefix caching %s, reserved CPU cores %s; started in %.1fs",
            config.version, config.model_dir, engine.blocks, engine.block_size, engine.capacity_tokens,
            config.kv_cache_bytes / 1e6, config.max_model_len, config.max_num_seqs, config.enforce_eager,
            config.enable_prefix_caching, os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM's default"),
            engine.started_s,
        )  # fmt: skip
        return engine

    # -- the engine contract ---------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def capacity_tokens(self) -> int:
        """Tokens of context vLLM's KV cache holds (blocks x block size): what admission may reserve."""
        return self.blocks * self.block_size

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._llm.errored

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def capacity(self) -> dict[str, Any]:
        """The engine's size and its own load (for /capacity and the startup log)."""
        return {
            "engine": "vllm",
            "model_version": self.version,
            "kv_cache_bytes": self.config.kv_cache_bytes,
            "kv_blocks": self.blocks,
            "kv_block_size": self.block_size,
            "capacity_tokens": self.capacity_tokens,
            "max_model_len": self.config.max_model_len,
            "max_num_seqs": self.config.max_num_seqs,
            "enforce_eager": self.config.enforce_eager,
            "cpu_reserved_cores": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
            "prefix_caching": self.config.enable_prefix_caching,
            "in_flight": self._in_flight,
            "draining": self._draining,
            **self.metrics.as_dict(),
        }

    @property
    def tokenizer(self) -> Any:  # the model's Hugging Face tokenizer as vLLM loaded it (chat template)
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Prompt tokens as the engine will see them (special tokens included)."""
        return len(self._encode(text))

    def admit(self) -> None:
        """Count a request in before its first await, so that :meth:`drain` waits for it; raises
        :class:`EngineStopped` once a drain has begun (the caller retries on the new version)."""
        if self._draining or self._stopped:
            raise EngineStopped(f"vllm engine v{self.version} is draining: no new requests")
        self._in_flight += 1

    def leave(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)

    async def generate(
        self, prompt: str, max_new_tokens: int, params: SamplingParams | None = None
    ) -> Generation:
        """One request's continuation, cut at EOS, at the first stop string or at the budget.
        Admits the request itself (see :meth:`admit`)."""
        stream = self.stream(prompt, max_new_tokens, params)
        async for _chunk in stream:
            pass
        assert stream.generation is not None
        return stream.generation

    def stream(self, prompt: str, max_new_tokens: int, params: SamplingParams | None = None) -> VLLMStream:
        """Start one streamed request (must be called on the engine's event loop). Raises ValueError
        naming the field for input vLLM would refuse; the request is admitted before this returns."""
        ids = self._encode(prompt)
        self._check(ids, max_new_tokens)
        self.admit()
        try:
            return VLLMStream(self, ids, max_new_tokens, params or GREEDY)
        except BaseException:
            self.leave()
            raise

    async def drain(self, timeout_s: float | None = None, poll_s: float = 0.02) -> None:
        """Refuse new requests, let every admitted one finish, then shut the engine down (hot swap).
        With ``timeout_s``, requests still running then are aborted (their clients see an error)."""
        self._draining = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._in_flight and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(poll_s)
        if self._in_flight:
            logger.warning("vllm engine v%s: %d requests still running at the drain timeout; aborted",
                           self.version, self._in_flight)  # fmt: skip
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Shut the engine-core process down and free its KV cache (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        self._llm.shutdown()
        logger.info("vllm engine v%s stopped", self.version)

    # -- internals shared with VLLMStream -------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        """The prompt's ids, tokenized once per request (see ENCODED_KEEP; on the demo model at one
        client, tokenizing twice was 2 % of the service worker's time)."""
        ids = self._encoded.pop(prompt, None)
        if ids is None:
            ids = tuple(self._tokenizer(prompt)["input_ids"])
        self._encoded[prompt] = ids
        if len(self._encoded) > ENCODED_KEEP:
            self._encoded.popitem(last=False)
        return list(ids)

    def _check(self, ids: list[int], max_new_tokens: int) -> None:
        if not ids:
            raise ValueError("prompt: encodes to no tokens (an empty prompt and a tokenizer without BOS)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the engine's "
                f"max_model_len {self.config.max_model_len}"
            )

    def _request_id(self) -> str:
        return f"lockgate-v{self.version}-{next(self._ids)}"

    def _sampling(self, max_new_tokens: int, params: SamplingParams) -> Any:
        from vllm import sampling_params as vllm_sampling

        return vllm_sampling.SamplingParams(
            max_tokens=max_new_tokens,
            temperature=params.temperature,  # 0.0: greedy
            top_p=1.0 if params.greedy else params.top_p,
            seed=None if params.greedy else params.seed,
            stop=list(params.stop) or None,
            presence_penalty=params.presence_penalty,  # OpenAI's, over generated tokens, as vLLM counts
            frequency_penalty=params.frequency_penalty,
            include_stop_str_in_output=False,
            skip_special_tokens=True,
            logprobs=0,  # the sampled token's own log-probability only
            output_kind=vllm_sampling.RequestOutputKind.DELTA,
        )

    def _confidence(self, logprob: float | None) -> float | None:
        if logprob is None:
            return None
        import torch

        p = torch.tensor([math.exp(logprob)])
        return float(calibrated(p, self.calibration_temperature)[0])


class VLLMStream:
    """One streamed request. Iterate it once, asynchronously (``async for``) on the engine's loop or
    synchronously from a worker thread (the transformers engine's ``TokenStream`` contract). When the
    iteration ends, ``generation`` holds the totals. ``cancel()`` (any thread) aborts the request in
    vLLM: its batch slot and KV blocks are freed at the next step."""

    def __init__(
        self, engine: VLLMEngine, ids: list[int], max_new_tokens: int, params: SamplingParams
    ) -> None:
        self._engine = engine
        self._ids = ids
        self._budget = max_new_tokens
        self._params = params
        self._request_id = engine._request_id()
        self._started = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._first_token_s: float | None = None
        self._produced = 0
        self.generation: Generation | None = None
        self._task = self._loop.create_task(self._produce())

    @property
    def request_id(self) -> str:
        return self._request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self._ids)

    @property
    def tokens_generated(self) -> int:
        """Tokens vLLM produced so far: below the budget after a cancel means it really stopped."""
        return self._produced

    async def _produce(self) -> None:
        from vllm.inputs.engine import tokens_input

        engine = self._engine
        text: list[str] = []
        first_logprob: float | None = None
        last: RequestOutput | None = None
        try:
            outputs = engine._llm.generate(
                tokens_input(self._ids),
                engine._sampling(self._budget, self._params),
                self._request_id,
            )
            async for out in outputs:
                last = out
                completion = out.outputs[0]
                if completion.token_ids:
                    if self._first_token_s is None:
                        self._first_token_s = time.perf_counter() - self._started
                        first_logprob = _sampled_logprob(completion)
                    self._produced += len(completion.token_ids)
                if completion.text:
                    text.append(completion.text)
                    self._chunks.put_nowait(("text", completion.text))
            if last is None:
                raise RuntimeError(f"vllm request {self._request_id} ended without output")
            completion = last.outputs[0]
            self.generation = Generation(
                text="".join(text),
                prompt_tokens=len(self._ids),
                output_tokens=self._produced,
                latency_s=time.perf_counter() - self._started,
                first_token_s=self._first_token_s,
                finish_reason=_finish_reason(completion.finish_reason, completion.stop_reason),
                confidence=engine._confidence(first_logprob),
            )
            self._chunks.put_nowait(("end", None))
        except asyncio.CancelledError:
            # vLLM's generate() aborts the request when it is cancelled; the reader just ends.
            self._chunks.put_nowait(("end", None))
            raise
        except Exception as exc:
            self._chunks.put_nowait(("error", exc))
        finally:
            engine.leave()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, payload = await self._chunks.get()
                if kind == "error":
                    raise payload
                if kind == "end":
                    return
                yield payload
        finally:
            self.cancel()  # a reader that stops early must not leave vLLM generating

    def __iter__(self) -> Iterator[str]:
        """From a worker thread (never from the engine's loop: it would wait on itself)."""
        try:
            while True:
                kind, payload = asyncio.run_coroutine_threadsafe(self._chunks.get(), self._loop).result()
                if kind == "error":
                    raise payload
                if kind == "end":
                    return
                yield payload
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Abort the request (safe from any thread; a no-op once it has finished)."""
        if self._task.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._task.cancel()
        else:
            self._loop.call_soon_threadsafe(self._task.cancel)

    def close(self) -> None:
        self.cancel()

    async def wait_closed(self) -> None:
        """Until vLLM has let go of the request (finished or aborted)."""
        await asyncio.gather(self._task, return_exceptions=True)


def _sampled_logprob(completion: Any) -> float | None:
    """Log-probability of the first generated token (``logprobs=0`` returns the sampled one)."""
    if not completion.logprobs:
        return None
    first = completion.logprobs[0]
    entry = first.get(completion.token_ids[0]) if hasattr(first, "get") else None
    return None if entry is None else float(entry.logprob)


def _finish_reason(finish_reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM says "stop" for EOS and for a stop string (``stop_reason`` then holds the string)."""
    if finish_reason == "length":
        return "length"
    if finish_reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    raise RuntimeError(f"vllm request ended with finish_reason {finish_reason!r}")
