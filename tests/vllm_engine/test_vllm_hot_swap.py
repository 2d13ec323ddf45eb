"""A hot swap on the vLLM engine (bentos/model_host.py): the new version's engine starts while the old one
serves, requests admitted on the old one finish there, a request that reaches the old one once it is
draining is handed to the new one, and the old engine (a process of its own) is stopped.

The model host is driven in-process on real vLLM engines (the registry polling that triggers a swap is
engine-agnostic and tested on the transformers engine in tests/test_hot_swap.py: the serving environment
reads a registry only through an MLflow server).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import IN_SERVING_ENV, build_tiny_model
from lockgate.bentos.config import ModelUri, ServiceConfig, ServiceEnv
from lockgate.bentos.protocol import GenerateRequest, PhaseTimings

pytestmark = [pytest.mark.vllm, pytest.mark.slow, IN_SERVING_ENV]

CONFIG = ServiceConfig.model_validate(
    {
        "engine": "vllm",
        "limits": {"max_new_tokens": 32, "max_prompt_chars": 200},
        "batching": {"max_batch_size": 8},
        "capacity": {"kv_cache_budget_mb": 8},
        "warmup_requests": 1,
    }
)


def _request(max_new_tokens: int) -> GenerateRequest:
    return GenerateRequest("Q: what is 2 plus 2?\nA:", max_new_tokens, 0.0, 1.0, None, (), None)


def test_hot_swap_starts_the_new_engine_drains_the_old_and_hands_over(tmp_path: Path) -> None:
    from lockgate.bentos.accounting import ServiceMetrics
    from lockgate.bentos.model_host import ModelHost, VLLMServed

    v1 = build_tiny_model(tmp_path / "v1", heads=2, kv_heads=1)
    v2 = build_tiny_model(tmp_path / "v2", seed=1, heads=2, kv_heads=1)
    env = ServiceEnv(model_uri=ModelUri.folder(v1), model_version="1", config=CONFIG)
    metrics = ServiceMetrics()

    async def run() -> None:
        host = ModelHost(env, lambda: metrics)
        try:
            host._swap_in(await host._load(host.uri))
            host.ready = True
            old = host.served
            assert isinstance(old, VLLMServed) and host.capacity()["engine"] == "vllm"
            # A long request admitted on v1 before the swap...
            running = asyncio.create_task(host.generate(_request(32), PhaseTimings()))
            await asyncio.sleep(0)
            host.env = env.model_copy(update={"model_version": "2"})  # the label of the version loaded next
            loaded = await host._load(ModelUri.folder(v2))  # v1 keeps serving while v2's engine starts
            host._swap_in(loaded)
            assert host.served is not None and host.served.version == "2"
            # ...finishes on v1, which drains, and new requests go to v2.
            served, gen = await running
            assert served is old and gen.output_tokens >= 1
            served, gen = await host.generate(_request(4), PhaseTimings())
            assert served.version == "2" and gen.output_tokens >= 1
            # A request handed to v1 after its drain began is retried on v2 (not failed).
            for _ in range(600):
                if not old.engine.alive:
                    break
                await asyncio.sleep(0.1)
            assert not old.engine.alive, "the old engine was not stopped after its drain"
            current = host.served
            reach_old = old.generate

            async def late(req: GenerateRequest, timings: PhaseTimings) -> object:
                host.served = current  # the swap lands while this request is on its way to v1
                return await reach_old(req, timings)

            old.generate = late  # type: ignore[method-assign]
            host.served = old
            served, gen = await host.generate(_request(4), PhaseTimings())
            assert served is current and gen.output_tokens >= 1
        finally:
            await host.stop()

    asyncio.run(run())
