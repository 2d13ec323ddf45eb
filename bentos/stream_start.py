"""Reading a streamed answer's chunks on the event loop, and its first chunk, or the news that its
client left before it came.

A streaming handler waits for the first chunk before it answers (so that a failure before the first
token is a real 500, not a 200 cut short). Until the response starts nobody listens for the client's
disconnect, and a model may produce many tokens before the first decodable text (a byte-level model's
partial UTF-8, or a long prefill): a client that left in that time used to have its whole generation
run to the end. Here the wait races the client's disconnect and cancels the generation when the client
goes first (found by tests/vllm_engine: the headers of a stream came only after all 800 tokens).

Engines stream two ways. The vLLM engine's stream is asynchronous (``__aiter__``): it is read on the
loop, no thread per chunk. The transformers engine's ``TokenStream`` blocks its reader until the next
token, so it is read from a thread; those threads come from a pool sized to the service's concurrency
limit (:func:`size_stream_readers`), not from asyncio's default pool, which has ``cpu_count + 4``
threads: on a 2-core host it read 6 streams at a time, and a 7th stream's first chunk waited for a
thread while its token was ready (streamed TTFT grew with the number of clients on both engines).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.responses import Response

Receive = Callable[[], Awaitable[dict[str, Any]]]

#: nginx's "client closed request": logged as the HTTP status of a request whose client left first.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before the stream's first chunk."""


_readers = ThreadPoolExecutor(64, thread_name_prefix="lockgate-stream-reader")


def size_stream_readers(concurrency: int) -> None:
    """One reader thread per request the front door lets in (``limits.concurrency``): each streamed
    request holds at most one while it waits for its next token. Threads start lazily."""
    global _readers
    if concurrency < 1:
        raise ValueError(f"limits.concurrency: must be >= 1, got {concurrency}")
    old, _readers = _readers, ThreadPoolExecutor(concurrency, thread_name_prefix="lockgate-stream-reader")
    old.shutdown(wait=False)


def stream_chunks(stream: Iterable[str]) -> AsyncIterator[str]:
    """The stream's text chunks, read on the running loop: an asynchronous stream directly, a blocking
    one from the reader threads. Iterate it once."""
    aiter_ = getattr(stream, "__aiter__", None)
    if aiter_ is not None:
        return aiter_()
    return _read_in_threads(stream)


async def _read_in_threads(stream: Iterable[str]) -> AsyncIterator[str]:
    chunks = iter(stream)
    loop = asyncio.get_running_loop()
    while (chunk := await loop.run_in_executor(_readers, next, chunks, None)) is not None:
        yield chunk


async def next_chunk(chunks: AsyncIterator[str]) -> str | None:
    """The next chunk, ``None`` at the end."""
    return await anext(chunks, None)


async def wait_for_disconnect(receive: Receive | None) -> None:
    """Return once the client has disconnected (never, without a ``receive`` to ask).

    Only call it after the request body has been read: a ``receive`` before that gives body chunks."""
    if receive is None:
        await asyncio.Event().wait()
        return
    while (await receive())["type"] != "http.disconnect":
        pass


async def first_chunk(
    chunks: AsyncIterator[str], cancel: Callable[[], None], receive: Receive | None
) -> str | None:
    """The next chunk of ``chunks`` (:func:`stream_chunks`; ``None`` when the stream is empty).

    Raises :class:`ClientGone` after calling ``cancel`` when the client disconnects first."""
    reading = asyncio.ensure_future(next_chunk(chunks))
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if reading.done():
        return reading.result()
    cancel()  # ends the iteration: the pending read returns at the producer's next step
    reading.add_done_callback(_ignore_outcome)
    raise ClientGone("client disconnected before the first chunk")


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    # Retrieve it, so asyncio does not report "exception never retrieved": nobody waits for it.
    if not future.cancelled():
        future.exception()


def client_gone_response() -> Response:
    """What a handler returns for a client that already left (nothing reads it; the log keeps 499)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)
