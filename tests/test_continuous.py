"""The continuous-batching engine (bentos/continuous.py) in-process on a tiny random Llama: same text as
plain greedy ``generate``, requests join and leave the running batch between decode steps, cancel frees
the slot, a stopping engine lets admitted requests finish. Real transformers engine, no mocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate.bentos.continuous import ContinuousEngine, engine_shape
from lockgate.bentos.runtime import LoadedModel, load_model

PROMPTS = [f"Q: what is {a} plus {b}?\nA:" for a, b in [(1, 2), (3, 4), (12, 7), (25, 9), (8, 8)]]


@pytest.fixture(scope="module")
def model(tiny_llm_dir: Path) -> LoadedModel:
    return load_model(tiny_llm_dir, device="cpu")


@pytest.fixture()
def engine(model: LoadedModel) -> Iterator[ContinuousEngine]:
    running = ContinuousEngine(
        model, engine_shape(max_batch_size=4, capacity_tokens=4096, max_context_tokens=256)
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_text_equals_plain_greedy_generate(model: LoadedModel, engine: ContinuousEngine) -> None:
    budgets = [3, 9, 16, 5, 12]
    expected = [model.generate([p], b)[0] for p, b in zip(PROMPTS, budgets, strict=True)]

    async def run() -> list:
        return await asyncio.gather(
            *(engine.generate(p, b, ()) for p, b in zip(PROMPTS, budgets, strict=True))
        )

    got = asyncio.run(run())
    assert [g.text for g in got] == [e.text for e in expected]
    assert [g.output_tokens for g in got] == [e.output_tokens for e in expected]
    assert [g.prompt_tokens for g in got] == [e.prompt_tokens for e in expected]
    # The confidence is the same first-token probability the plain path computes from its logits.
    assert [round(g.confidence, 5) for g in got] == [round(e.confidence, 5) for e in expected]
    assert all(g.first_token_s is not None and 0 < g.first_token_s <= g.latency_s for g in got)


def test_a_short_request_joins_and_leaves_a_running_long_one(engine: ContinuousEngine) -> None:
    """Iteration-level batching: a 2-token request sent while a 200-token one decodes finishes long
    before it (whole-request batching would make it wait for the long one, or join and wait to the end)."""

    async def run() -> tuple[float, float, int]:
        long = asyncio.create_task(engine.generate(PROMPTS[0], 200, ()))
        await asyncio.sleep(0.05)  # the long request is decoding
        short = await engine.generate(PROMPTS[1], 2, ())
        short_done = time.perf_counter()
        assert 1 <= short.output_tokens <= 2
        long_result = await long
        return short_done, time.perf_counter(), long_result.output_tokens

    short_done, long_done, long_tokens = asyncio.run(run())
    if long_tokens < 50:
        pytest.fail(f"the random model stopped after {long_tokens} tokens: pick a prompt that runs long")
    assert short_done < long_done


def test_stop_string_cuts_and_frees_the_slot(model: LoadedModel, engine: ContinuousEngine) -> None:
    full = model.generate([PROMPTS[2]], 16)[0].text
    stop = full[3:5]
    got = asyncio.run(engine.generate(PROMPTS[2], 16, (stop,)))
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    assert engine.in_flight == 0


def test_cancelled_stream_stops_generating(engine: ContinuousEngine) -> None:
    async def run() -> tuple[list[str], int]:
        stream = engine.stream(PROMPTS[3], 200, ())
        chunks = iter(stream)
        first = await asyncio.to_thread(next, chunks)
        stream.cancel()
        rest = await asyncio.to_thread(list, chunks)
        await asyncio.sleep(0.1)
        return [first, *rest], stream.tokens_generated

    chunks, generated = asyncio.run(run())
    assert chunks and chunks[0]
    assert generated < 200, "the engine kept generating for a cancelled stream"
    assert engine.in_flight == 0


def test_stream_text_equals_unary_text(engine: ContinuousEngine) -> None:
    async def run() -> tuple[str, str]:
        stream = engine.stream(PROMPTS[4], 12, ())
        streamed = "".join(await asyncio.to_thread(list, stream))
        return streamed, (await engine.generate(PROMPTS[4], 12, ())).text

    streamed, unary = asyncio.run(run())
    assert streamed == unary


def test_drain_and_stop_lets_admitted_requests_finish(engine: ContinuousEngine) -> None:
    async def run() -> list[int]:
        running = [asyncio.create_task(engine.generate(p, 24, ())) for p in PROMPTS]
        await asyncio.sleep(0.02)
        await engine.drain_and_stop()
        return [r.output_tokens for r in await asyncio.gather(*running)]

    assert all(n >= 1 for n in asyncio.run(run()))
    assert not engine.alive


def test_engine_restarts_after_transformers_stopped_it(engine: ContinuousEngine) -> None:
    """transformers stops its engine when a decode step raises; the next request starts a new one."""
    engine._manager.stop(block=True)  # what a failed step leaves behind
    got = asyncio.run(engine.generate(PROMPTS[0], 4, ()))
    assert got.output_tokens >= 1 and engine.restarts == 1 and engine.alive


def test_out_of_vocabulary_prompt_is_refused_alone(engine: ContinuousEngine) -> None:
    with pytest.raises(IndexError, match="index out of range"):
        from lockgate.bentos.continuous import _check_vocabulary

        _check_vocabulary([1, 2, 10_000], rows=300)
    assert asyncio.run(engine.generate(PROMPTS[1], 3, ())).output_tokens >= 1


def test_a_stream_started_just_before_a_hot_swap_finishes(engine: ContinuousEngine) -> None:
    """The swap's drain must wait for a stream whose engine task has not started yet."""

    async def run() -> tuple[str, object]:
        stream = engine.stream(PROMPTS[2], 6, ())
        await engine.drain_and_stop()  # the hot swap retires this engine right away
        return "".join(await asyncio.to_thread(list, stream)), stream.generation

    text, generation = asyncio.run(run())
    assert text and generation is not None and generation.output_tokens >= 1
    assert not engine.alive
