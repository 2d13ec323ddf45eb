"""Reading streamed answers on the event loop (bentos/stream_start.py).

The transformers engine's streams block their reader until the next token. They used to be read with
``asyncio.to_thread``, whose default pool has ``cpu_count + 4`` threads: on this 2-core host 6 streams
at a time, so with 16 streaming clients 10 waited for a thread although their tokens were ready."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from lockgate.bentos.stream_start import (
    ClientGone,
    first_chunk,
    next_chunk,
    size_stream_readers,
    stream_chunks,
)

STREAMS = 16  # more than asyncio's default pool on 2 cores (6)


class BlockingStream:
    """A stream shaped like the transformers engine's TokenStream: ``__iter__`` blocks its thread.
    Its first chunk comes only once every stream of the group is being read at the same time."""

    def __init__(self, together: threading.Barrier, name: str, wait_s: float = 10) -> None:
        self._together = together
        self._wait_s = wait_s
        self.name = name
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[str]:
        self._together.wait(timeout=self._wait_s)  # BrokenBarrierError when fewer readers run at once
        yield f"{self.name}:first"
        yield f"{self.name}:second"

    def cancel(self) -> None:
        self.cancelled.set()


class AsyncStream:
    """A stream shaped like the vLLM engine's: read on the loop (``__aiter__``)."""

    def __init__(self, chunks: list[str]) -> None:
        self._chunks = chunks
        self.reader_threads: set[str] = set()

    async def __aiter__(self) -> AsyncIterator[str]:
        for chunk in self._chunks:
            self.reader_threads.add(threading.current_thread().name)
            await asyncio.sleep(0)
            yield chunk

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("an asynchronous stream must not be read from a thread")


async def _read_all(stream: object) -> list[str]:
    chunks = stream_chunks(stream)  # type: ignore[arg-type]
    return [chunk async for chunk in chunks]


def test_every_blocking_stream_is_read_at_once_up_to_the_concurrency_limit() -> None:
    size_stream_readers(STREAMS)
    together = threading.Barrier(STREAMS)
    streams = [BlockingStream(together, f"s{i}") for i in range(STREAMS)]

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(_read_all(s) for s in streams))

    answers = asyncio.run(main())
    assert answers == [[f"s{i}:first", f"s{i}:second"] for i in range(STREAMS)]
    assert not together.broken


def test_the_default_pool_would_have_starved_them() -> None:
    """The same streams read the old way (asyncio.to_thread) break the barrier: the bug is real here."""
    together = threading.Barrier(STREAMS)
    streams = [BlockingStream(together, f"s{i}", wait_s=2) for i in range(STREAMS)]

    async def old_way(stream: BlockingStream) -> str | None:
        return await asyncio.to_thread(next, iter(stream), None)

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(6))  # asyncio's default size on a 2-core host
        return await asyncio.gather(*(old_way(s) for s in streams), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert any(isinstance(o, threading.BrokenBarrierError) for o in outcomes)


def test_an_asynchronous_stream_is_read_on_the_loop_thread() -> None:
    stream = AsyncStream(["a", "b", "c"])
    assert asyncio.run(_read_all(stream)) == ["a", "b", "c"]
    assert stream.reader_threads == {threading.main_thread().name}


def test_first_chunk_then_the_rest_and_none_at_the_end() -> None:
    async def main() -> tuple[str | None, str | None, str | None]:
        chunks = stream_chunks(AsyncStream(["x", "y"]))  # type: ignore[arg-type]
        first = await first_chunk(chunks, lambda: None, receive=None)
        return first, await next_chunk(chunks), await next_chunk(chunks)

    assert asyncio.run(main()) == ("x", "y", None)


def test_a_client_gone_before_the_first_chunk_cancels_the_stream() -> None:
    stream = BlockingStream(threading.Barrier(2), "lonely", wait_s=2)  # never gets its first chunk by itself

    async def disconnected() -> dict[str, str]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        await first_chunk(stream_chunks(stream), stream.cancel, disconnected)

    with pytest.raises(ClientGone):
        asyncio.run(main())
    assert stream.cancelled.is_set()


def test_a_reader_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match=r"limits\.concurrency"):
        size_stream_readers(0)
