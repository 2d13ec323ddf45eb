"""Continuous (iteration-level) batching for the service, on transformers' continuous-batching engine.

A request joins the running batch between two decode steps and leaves it as soon as it is done, so a
short answer never waits for a long one, and a new request never waits for a whole batch to finish
(what whole-request batching does: ``MicroBatcher`` in bentos/llm_service.py). The KV cache is paged
(blocks of ``page_size`` tokens), sized from the service's KV-cache budget.

What runs here: greedy requests (``temperature == 0``), unary and streamed. Sampling requests stay on the
micro-batcher: transformers' engine picks sampling or argmax for the whole engine, and one RNG serves all
rows, so a seed could not give the same text twice. Both paths can run at once on the same weights
(the engine keeps its own cache and leaves the model's attention implementation alone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from lockgate.bentos.runtime import Generation, LoadedModel, SamplingParams, TokenStream, calibrated

logger = logging.getLogger(__name__)

#: Tokens per KV-cache block. Small enough that a short request wastes little of its last block,
#: large enough that the block table stays short.
PAGE_SIZE = 64
#: Default for the most tokens one forward step processes (decode rows + prefill chunks). Bounds the
#: step's activations and its attention mask (tokens x cached tokens): transformers' default of 8192 with
#: a cache of 250k tokens asks for over 10 GB of mask alone. Longer prompts are prefilled in chunks over
#: several steps; smaller steps keep running requests' inter-token latency lower while prompts arrive.
MAX_STEP_TOKENS = 2048


@dataclass(frozen=True)
class EngineShape:
    """How big the engine is: requests decoded together and KV-cache tokens they share."""

    max_requests: int
    cache_tokens: int
    step_tokens: int = MAX_STEP_TOKENS

    @property
    def blocks(self) -> int:
        # One extra block per request slot: each request rounds its last block up.
        return math.ceil(self.cache_tokens / PAGE_SIZE) + self.max_requests


def engine_shape(
    max_batch_size: int, capacity_tokens: int, max_context_tokens: int, step_tokens: int = MAX_STEP_TOKENS
) -> EngineShape:
    """The cache holds what the admission lets in (``capacity_tokens`` reserved at most), but never
    more than ``max_batch_size`` full-context requests: requests queued inside the engine hold no blocks."""
    cache = max(PAGE_SIZE, min(capacity_tokens, max_batch_size * max_context_tokens))
    return EngineShape(max_batch_size, cache, min(step_tokens, cache))


class ContinuousEngine:
    """One model version's continuous-batching engine (a background decode thread owned by transformers).

    ``generate`` and ``stream`` must be called from the event loop: results come back through
    ``loop.call_soon_threadsafe``.
    """

    def __init__(
        self, model: LoadedModel, shape: EngineShape, on_join: Callable[[int], None] = lambda _n: None
    ) -> None:
        self.model = model
        self.shape = shape
        self._on_join = on_join  # told how many requests are in the engine, the new one included
        self._ids = itertools.count()
        self._in_flight = 0
        self._manager: Any = None  # transformers' ContinuousBatchingManager, set by start()
        self._lock = threading.Lock()
        self._restarting: asyncio.Lock | None = None
        self._stopped = False
        self.restarts = 0
        self._vocab_rows = model.model.get_input_embeddings().weight.shape[0]

    @staticmethod
    def accepts(temperature: float) -> bool:
        """Whether a request with this temperature runs here (greedy only; see the module docstring)."""
        return temperature == 0.0

    def start(self) -> None:
        """Allocate the paged cache and start the decode thread (blocking: call it in a worker thread)."""
        from transformers.generation import ContinuousBatchingConfig

        m = self.model
        eos = sorted(m._eos_ids)
        generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=16,  # every request passes its own budget
            eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
            pad_token_id=m.tokenizer.pad_token_id,
        )
        cuda = m.device.startswith("cuda")
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=self.shape.blocks,
            max_requests_per_batch=self.shape.max_requests,
            max_batch_tokens=self.shape.step_tokens,
            return_logprobs=True,  # the first token's probability is the response's confidence
            use_cuda_graph=cuda,
            # Keep the model's own attention implementation: sampling requests run plain generate on it.
            auto_switch_to_flash=False,
        )
        manager = m.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        # Builds the batch processor and runs dummy batches (captures the CUDA graphs on a GPU), as
        # transformers' own entry points do; starting without it failed every step on a Qwen2 model.
        manager.warmup()
        manager.start()
        self._manager = manager
        logger.info(
            "continuous batching on %s: %d requests per step, %d KV blocks of %d tokens, cuda graphs %s",
            m.device, self.shape.max_requests, self.shape.blocks, PAGE_SIZE, cuda,
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        """Not stopped (a manager that a failed step stopped is restarted by the next request)."""
        return self._manager is not None and not self._stopped

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def generate(self, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> Generation:
        """Greedy continuation of ``prompt``; cut at EOS, at the first ``stop`` string or the budget."""
        started = time.perf_counter()
        ids = self.model.tokenizer(prompt)["input_ids"]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        request_id = self._request_id()
        self._admit()

        def on_output(output: Any) -> None:
            if done.done():
                return
            if output.error is not None:
                done.set_exception(RuntimeError(f"continuous batching: {output.error}"))
            elif output.is_finished():
                done.set_result(output)
            elif stop and _has_stop(self.model, output.generated_tokens, stop):
                self._cancel(request_id)  # the stop string is complete: free the slot now
                done.set_result(output)

        # Streamed internally only when stop strings must be watched token by token.
        output = await self._run(request_id, ids, max_new_tokens, on_output, done, streaming=bool(stop))
        text, used, reason = self.model._finish(list(output.generated_tokens)[:max_new_tokens], stop)
        stamps = output.timestamps or []
        return Generation(
            text=text,
            prompt_tokens=len(ids),
            output_tokens=used,
            latency_s=time.perf_counter() - started,
            first_token_s=stamps[0] - started if stamps else None,  # both perf_counter readings
            finish_reason=reason,
            confidence=self._confidence(output.logprobs),
        )

    def stream(self, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> ContinuousStream:
        """Start a streamed greedy request; iterate the result (in a worker thread) for text chunks."""
        return ContinuousStream(self, prompt, max_new_tokens, stop)

    async def drain_and_stop(self, poll_s: float = 0.02) -> None:
        """Let every admitted request finish, then stop the decode thread and free the cache (hot swap)."""
        while self._in_flight:
            await asyncio.sleep(poll_s)
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None and manager.is_running():
            manager.stop(block=True, timeout=30)

    # -- internals shared with ContinuousStream ---------------------------------------------------------

    def _request_id(self) -> str:
        return f"lockgate-{next(self._ids)}"

    def _admit(self) -> None:
        """Count a request in before its first await: a hot swap's ``drain_and_stop`` then waits for it
        (counted inside ``_run``, a request that captured this engine just before the swap could find it
        stopped). ``_run`` counts it out, however it ends."""
        if self._stopped:
            raise RuntimeError("continuous-batching engine is stopped")
        self._in_flight += 1
        self._on_join(self._in_flight)

    async def _run(
        self,
        request_id: str,
        ids: list[int],
        max_new_tokens: int,
        on_output: Any,
        done: asyncio.Future[Any],
        streaming: bool,
    ) -> Any:
        """Run one admitted request (see ``_admit``) to its end."""
        try:
            _check_vocabulary(ids, self._vocab_rows)
            manager = await self._running_manager()
            manager.register_result_handler(request_id, on_output)
            added = manager.add_request(
                ids,
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=streaming,
                record_timestamps=True,
            )
            if added is None:
                raise RuntimeError("continuous-batching engine refused the request (it is stopping)")
            return await done
        except BaseException:
            self._cancel(request_id)  # client gone (CancelledError) or failure: free its cache blocks
            raise
        finally:
            self._in_flight -= 1

    async def _running_manager(self) -> Any:
        """The manager, restarted first if a failed batch stopped it (transformers stops the engine on
        an error inside a decode step and fails that step's requests): one bad batch must not take
        every later request down with it."""
        if self._stopped:
            raise RuntimeError("continuous-batching engine is stopped")
        if self._restarting is None:
            self._restarting = asyncio.Lock()
        async with self._restarting:
            manager = self._manager
            if manager is None or not manager.is_running():
                self.restarts += 1
                logger.warning(
                    "continuous-batching engine stopped after a failed step; restart %d", self.restarts
                )
                await asyncio.to_thread(self._replace_manager, manager)
            return self._manager

    def _replace_manager(self, dead: Any) -> None:
        if dead is not None:
            dead.stop(block=True, timeout=30)
        self.start()

    def _cancel(self, request_id: str) -> None:
        manager = self._manager
        if manager is None:
            return
        manager.cancel_request(request_id)
        # A cancelled request gets no final output, so its handler would never be removed.
        router = manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def _confidence(self, logprobs: list[float] | None) -> float | None:
        if not logprobs:
            return None
        p = torch.tensor([math.exp(logprobs[0])])
        return float(calibrated(p, self.model.calibration_temperature)[0])


def _check_vocabulary(ids: list[int], rows: int) -> None:
    """A request that would fail the whole decode step of every request in it is refused before it
    joins: no tokens at all, or a token id the embedding has no row for (tokenizer and model that do
    not match)."""
    if not ids:
        raise ValueError("prompt: encodes to no tokens (an empty prompt and a tokenizer without BOS)")
    if max(ids) >= rows:
        raise IndexError(
            f"index out of range: prompt token id {max(ids)} >= the model's {rows} embedding rows "
            "(tokenizer and model do not match)"
        )


def _has_stop(model: LoadedModel, tokens: list[int], stop: tuple[str, ...]) -> bool:
    text = model._decode(list(tokens))
    return any(s in text for s in stop)


class ContinuousStream(TokenStream):
    """A streamed request of the continuous-batching engine: new tokens arrive through the engine's
    result handler (on the event loop) and are read by the iterator (in a worker thread)."""

    def __init__(
        self, engine: ContinuousEngine, prompt: str, max_new_tokens: int, stop: tuple[str, ...]
    ) -> None:
        super().__init__(engine.model, max_new_tokens, SamplingParams(0.0, 1.0, None, stop))
        self._engine = engine
        ids = engine.model.tokenizer(prompt)["input_ids"]
        self._prompt_tokens = len(ids)
        self._request_id = engine._request_id()
        engine._admit()
        self._seen = 0
        self._logprobs: list[float] = []
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[Any] = loop.create_future()
        self._task = loop.create_task(
            engine._run(self._request_id, ids, max_new_tokens, self._on_output, self._done, streaming=True)
        )
        self._task.add_done_callback(self._finished)

    def _on_output(self, output: Any) -> None:
        if self._done.done():
            return
        if output.error is not None:
            self._done.set_exception(RuntimeError(f"continuous batching: {output.error}"))
            return
        tokens = list(output.generated_tokens)
        if len(tokens) > self._seen:
            fresh = tokens[self._seen :]
            self._tokens.produced += len(fresh)
            self._tokens.items.put(("tokens", fresh))
            self._seen = len(tokens)
        if output.logprobs and not self._logprobs:
            self._logprobs = list(output.logprobs[:1])
        if output.is_finished():
            self._done.set_result(output)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._tokens.end()
        elif task.exception() is not None:
            self._tokens.items.put(("error", task.exception()))
        else:
            self._tokens.end()

    def cancel(self) -> None:
        """Stop generating (safe from any thread): the slot and its cache blocks are freed next step."""
        loop = self._task.get_loop()
        if not self._task.done():
            loop.call_soon_threadsafe(self._cancel_on_loop)

    def _cancel_on_loop(self) -> None:
        if not self._done.done():
            self._done.cancel()

    def close(self) -> None:
        self.cancel()  # the engine's thread needs nothing from us to let go: no wait

    def _confidence(self) -> float | None:
        return self._engine._confidence(self._logprobs)
