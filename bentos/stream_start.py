"""The first chunk of a streamed answer, or the news that its client left before it came.

A streaming handler waits for the first chunk before it answers (so that a failure before the first
token is a real 500, not a 200 cut short). Until the response starts nobody listens for the client's
disconnect, and a model may produce many tokens before the first decodable text (a byte-level model's
partial UTF-8, or a long prefill): a client that left in that time used to have its whole generation
run to the end. Here the wait races the client's disconnect and cancels the generation when the client
goes first (found by tests/vllm_engine: the headers of a stream came only after all 800 tokens).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from starlette.responses import Response

Receive = Callable[[], Awaitable[dict[str, Any]]]

#: nginx's "client closed request": logged as the HTTP status of a request whose client left first.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before the stream's first chunk."""


async def wait_for_disconnect(receive: Receive | None) -> None:
    """Return once the client has disconnected (never, without a ``receive`` to ask).

    Only call it after the request body has been read: a ``receive`` before that gives body chunks."""
    if receive is None:
        await asyncio.Event().wait()
        return
    while (await receive())["type"] != "http.disconnect":
        pass


async def first_chunk(
    chunks: Iterator[str], cancel: Callable[[], None], receive: Receive | None
) -> str | None:
    """The next chunk of ``chunks`` (``None`` when the stream is empty), read from a worker thread.

    Raises :class:`ClientGone` after calling ``cancel`` when the client disconnects first."""
    reading = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if reading.done():
        return reading.result()
    cancel()  # ends the iteration: the worker thread's wait returns at the producer's next step
    reading.add_done_callback(_ignore_outcome)
    raise ClientGone("client disconnected before the first chunk")


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    # Retrieve it, so asyncio does not report "exception never retrieved": nobody waits for it.
    if not future.cancelled():
        future.exception()


def client_gone_response() -> Response:
    """What a handler returns for a client that already left (nothing reads it; the log keeps 499)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)
