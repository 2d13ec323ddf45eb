"""Whole-request micro-batching: concurrent requests that decode the same way share one batched
``LoadedModel.generate`` call (engine ``static``, and sampling requests under any engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lockgate.bentos.protocol import GenerateRequest, PhaseTimings

if TYPE_CHECKING:
    from lockgate.bentos.runtime import Generation, LoadedModel


@dataclass(frozen=True)
class _BatchKey:
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


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
    penalties = (req.presence_penalty, req.frequency_penalty)  # one logits processor per call
    if req.temperature == 0.0:
        return _BatchKey(0.0, 1.0, req.stop, *penalties)  # top_p and seed do not matter for greedy
    if req.seed is not None:
        return None
    return _BatchKey(req.temperature, req.top_p, req.stop, *penalties)


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
                presence_penalty=first.presence_penalty,
                frequency_penalty=first.frequency_penalty,
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
