"""KV-cache budget and backpressure: how many tokens of context fit, and who waits for them.

The chapter's formula for the KV cache of a decoder-only transformer::

    bytes = batch × seq × layers × kv_heads × head_dim × 2 (K and V) × dtype bytes

Grouped-query attention is why ``kv_heads`` (``num_key_value_heads``) and not the attention heads
appear: a Qwen2-0.5B has 24 layers × 2 KV heads × 64 head_dim × 2 × 2 bytes (bf16) = 12 KiB per token.

Every request reserves ``prompt_tokens + max_new_tokens`` before it runs (its worst case: the runtime
keeps no paged cache, so a request's KV grows up to that and is freed only when it ends). Requests that
do not fit wait in FIFO order; when ``max_queue`` are already waiting, a new one is refused at once
(the service answers 503 with Retry-After) rather than queued into an out-of-memory crash.

Left padding: the micro-batcher pads a batch to its longest prompt, so one batched call holds
rows × (longest prompt + largest budget) tokens, possibly more than its rows reserved one by one; it
splits batches so that each call alone fits the capacity (``fit_padded_kv`` in bentos/llm_service.py).
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What the budget defaults to when none is configured: the share of free memory the cache may take.
# On a GPU the weights are already loaded when this is measured, and activations of a decode step are
# small next to the cache (vLLM's gpu_memory_utilization defaults to 0.9 of the whole card). On CPU
# the memory is shared with every other process of the host, so take half of what is available.
GPU_FREE_FRACTION = 0.9
CPU_AVAILABLE_FRACTION = 0.5


@dataclass(frozen=True)
class KVShape:
    """The per-token KV-cache dimensions of one model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_positions: int | None

    @property
    def bytes_per_token(self) -> int:
        return kv_cache_bytes(1, 1, self)


def kv_cache_bytes(batch: int, seq: int, shape: KVShape) -> int:
    """The chapter's formula: batch × seq × layers × kv_heads × head_dim × 2 × dtype bytes."""
    return batch * seq * shape.layers * shape.kv_heads * shape.head_dim * 2 * shape.dtype_bytes


def kv_shape(config: Any, dtype_bytes: int) -> KVShape:
    """Read the KV dimensions from a transformers config (multimodal configs: their text part)."""
    config = getattr(config, "text_config", None) or config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    # Some families (Gemma, Qwen3) set head_dim explicitly, not hidden_size / heads.
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    positions = getattr(config, "max_position_embeddings", None)
    return KVShape(layers, kv_heads, head_dim, dtype_bytes, int(positions) if positions else None)


def model_kv_shape(model: Any) -> KVShape:
    """KV dimensions of a loaded model; the cache has the dtype of its floating-point parameters
    (weight-only INT8/INT4 models still compute, and cache, in their activation dtype)."""
    import torch

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return kv_shape(model.config, torch.empty((), dtype=dtype).element_size())


def free_memory_bytes(device: str) -> int:
    """Memory the cache could use now: free GPU memory on CUDA, MemAvailable on CPU (Linux)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * GPU_FREE_FRACTION)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * CPU_AVAILABLE_FRACTION)
    return 1 << 30  # not Linux: assume 1 GiB rather than guess high


@dataclass(frozen=True)
class KVBudget:
    """What fits: the budget in bytes and tokens, and how many full-context requests that is."""

    shape: KVShape
    budget_bytes: int
    source: str  # "configured" or "free memory"
    max_context_tokens: int  # the longest prompt + new tokens one request may reserve

    @property
    def capacity_tokens(self) -> int:
        return self.budget_bytes // self.shape.bytes_per_token

    @property
    def full_context_requests(self) -> int:
        """Requests of ``max_context_tokens`` each that fit at once (the batch × seq trade-off)."""
        return self.capacity_tokens // max(1, self.max_context_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_per_token": self.shape.bytes_per_token,
            "layers": self.shape.layers,
            "kv_heads": self.shape.kv_heads,
            "head_dim": self.shape.head_dim,
            "dtype_bytes": self.shape.dtype_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.source,
            "capacity_tokens": self.capacity_tokens,
            "max_context_tokens": self.max_context_tokens,
            "full_context_requests": self.full_context_requests,
        }


def plan_budget(
    shape: KVShape, budget_mb: float | None, free_bytes: int, max_context_tokens: int
) -> KVBudget:
    """The budget from the setting (``kv_cache_budget_mb``, 1 MB = 10^6 bytes) or, when None, from
    free memory. ``max_context_tokens`` is capped by the model's position limit."""
    if budget_mb is not None:
        budget, source = int(budget_mb * 1_000_000), "configured"
    else:
        budget, source = free_bytes, "free memory"
    if shape.max_positions is not None:
        max_context_tokens = min(max_context_tokens, shape.max_positions)
    return KVBudget(shape, budget, source, max_context_tokens)


class QueueFull(Exception):
    """More requests wait for KV-cache room than ``max_queue`` allows: answer 503 with Retry-After."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"{waiting} requests already wait for KV-cache room (max_queue)")
        self.retry_after_s = retry_after_s


class KVAdmission:
    """FIFO admission of requests by their token reservation against the cache's capacity.

    Single event loop only (no locks needed): ``acquire`` and ``release`` run on the service's loop.
    A request that is cancelled while waiting leaves the queue without taking room.
    """

    def __init__(
        self, capacity_tokens: int, max_queue: int, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_queue = max_queue
        self._on_change = on_change
        self.in_use = 0
        self.running = 0  # reservations held
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        # Recent service time per reservation, for Retry-After: a rough "when will there be room".
        self._mean_hold_s = 1.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> float:
        """Seconds until the queue has likely moved past one more request: the waiters ahead drain
        about ``running`` at a time, each in about the recent mean hold time (at least 1 s)."""
        rounds = (self.waiting + 1) / max(1, self.running)
        return float(max(1, math.ceil(self._mean_hold_s * rounds)))

    async def acquire(self, tokens: int) -> None:
        """Reserve ``tokens``; waits while others hold the room; raises QueueFull when the queue is full.

        Callers check ``tokens <= capacity_tokens`` first (a request that can never fit is a 422)."""
        if tokens > self.capacity_tokens:
            raise ValueError(f"a reservation of {tokens} tokens exceeds the capacity {self.capacity_tokens}")
        if not self._waiters and self.in_use + tokens <= self.capacity_tokens:
            self.in_use += tokens
            self.running += 1
            self._on_change()
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(len(self._waiters), self.retry_after_s())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, future)
        self._waiters.append(entry)
        self._on_change()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(tokens)  # room was granted just as the waiter was cancelled: give it back
            elif entry in self._waiters:  # cancelled while waiting (resize already removed failed ones)
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, tokens: int, held_s: float | None = None) -> None:
        """Give back a reservation and admit waiters that now fit (in arrival order)."""
        self.in_use = max(0, self.in_use - tokens)
        self.running = max(0, self.running - 1)
        if held_s is not None:
            self._mean_hold_s = 0.8 * self._mean_hold_s + 0.2 * held_s
        self._wake()

    def resize(self, capacity_tokens: int) -> None:
        """A new model (hot swap) has another capacity: waiters that can never fit it are failed
        (ValueError, as ``acquire`` raises), those that fit now are admitted."""
        self.capacity_tokens = capacity_tokens
        for entry in [e for e in self._waiters if e[0] > capacity_tokens]:
            self._waiters.remove(entry)
            if not entry[1].done():
                entry[1].set_exception(ValueError(f"a reservation of {entry[0]} tokens exceeds the capacity"))
        self._wake()

    def _wake(self) -> None:
        # FIFO without overtaking: a small request behind a large one waits too, so large ones never
        # starve under a stream of small ones.
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity_tokens:
            tokens, future = self._waiters.popleft()
            if future.done():
                continue
            self.in_use += tokens
            self.running += 1
            future.set_result(None)
        self._on_change()
