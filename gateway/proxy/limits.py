"""Bounds on what an upstream can make a call hold: stream size and duration, stored bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.errors import UpstreamTimeout, UpstreamTooLarge


async def bounded_stream(
    chunks: AsyncIterator[bytes], *, max_bytes: int, max_seconds: float
) -> AsyncIterator[bytes]:
    """`chunks`, cut with an `UpstreamError` once they pass `max_bytes` or `max_seconds`.

    The deadline covers the whole stream, so an upstream that keeps trickling (or never
    ends) is cut even though each chunk arrives within the upstream's own timeouts. It is one
    timer for the stream: `asyncio.timeout` around each read would set and clear a timer per
    chunk, about 8 µs each, the largest single cost of relaying an event.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    waiting = expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        if waiting:  # else the next read is refused: the consumer is busy with a chunk
            task.cancel()

    timer = loop.call_later(max_seconds, expire)
    seen = 0
    try:
        while True:
            if expired:
                raise _ran_long(max_seconds)
            cancelling = task.cancelling()
            waiting = True
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                # Ours only when nobody else cancelled the task too (as asyncio.timeout does).
                if expired and task.uncancel() <= cancelling:
                    raise _ran_long(max_seconds) from None
                raise
            finally:
                waiting = False
            seen += len(chunk)
            if seen > max_bytes:
                raise UpstreamTooLarge(
                    f"the upstream stream passed {max_bytes} bytes (limits.max_stream_bytes)"
                )
            yield chunk
    finally:
        timer.cancel()


def _ran_long(max_seconds: float) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"the upstream stream ran past {max_seconds:g}s (limits.max_stream_seconds)"
    )


def stored_body(body: Any, limit: int, *, size_hint: int | None = None) -> tuple[Any, int | None]:
    """`body` as it is stored on a span, and its size in bytes if it had to be cut to `limit`.

    A decoded body (the assembled answer of a stream) is serialised only when `size_hint`,
    the bytes it was assembled from, says it may be over the limit: most calls pay nothing.
    """
    if body is None:
        return None, None
    if isinstance(body, bytes | bytearray):
        raw = bytes(body)
    elif size_hint is not None and size_hint <= limit:
        return body, None
    else:
        try:
            raw = orjson.dumps(body)
        except TypeError:
            return body, None
    if len(raw) <= limit:
        return body, None
    # Cut bytes, not characters: a split UTF-8 sequence is replaced when it is written.
    return raw[:limit], len(raw)
