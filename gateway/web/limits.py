"""Bounds on what a client or an upstream can make the gateway wait for or hold in memory.

Each helper turns one unbounded operation (a body read, a write to a client, an upstream
stream, a stored body, a metric label) into one with a configured limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import UpstreamTimeout, UpstreamTooLarge

OTHER_LABEL = "other"
# Kernel send buffer of a streamed answer's socket. Left to autotuning it grows to megabytes,
# which a client that stops reading pins for every stream; tokens need far less.
STREAM_SEND_BUFFER = 64 * 1024


class ClientTooSlow(ConnectionError):
    """A write to the client made no progress within `server.write_timeout`: it stopped reading.

    A `ConnectionError`, so every path that handles a client that went away handles it too.
    """


async def write_within(
    request: web.Request, response: web.StreamResponse, data: bytes, timeout: float
) -> None:
    """`response.write(data)`, dropping the client if it stops reading for `timeout` seconds.

    aiohttp's write waits for the socket to drain with no deadline, so a client that never
    reads would hold its handler, its upstream stream and its buffers forever.
    """
    try:
        async with asyncio.timeout(timeout):
            await response.write(data)
    except TimeoutError as exc:
        if request.transport is not None:
            # Frees the kernel and transport buffers now rather than at some later close.
            request.transport.abort()
        raise ClientTooSlow(f"the client read nothing for {timeout:g}s") from exc


def bound_send_buffer(request: web.Request) -> None:
    """Cap the kernel memory a client that stops reading can pin, before a stream starts."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)


async def bounded_stream(
    chunks: AsyncIterator[bytes], *, max_bytes: int, max_seconds: float
) -> AsyncIterator[bytes]:
    """`chunks`, cut with an `UpstreamError` once they pass `max_bytes` or `max_seconds`.

    The deadline covers the whole stream, so an upstream that keeps trickling (or never
    ends) is cut even though each chunk arrives within the upstream's own timeouts.
    """
    deadline = asyncio.get_running_loop().time() + max_seconds
    seen = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the upstream stream ran past {max_seconds:g}s (limits.max_stream_seconds)"
            ) from exc
        seen += len(chunk)
        if seen > max_bytes:
            raise UpstreamTooLarge(
                f"the upstream stream passed {max_bytes} bytes (limits.max_stream_bytes)"
            )
        yield chunk


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


class LabelCap:
    """At most `limit` distinct values for one metric label; the rest become `other`.

    Values from clients (tool names, model names) would otherwise mint a new time series
    each, growing `/metrics` and memory without bound.
    """

    def __init__(self, limit: int, known: frozenset[str] = frozenset()) -> None:
        self.limit = limit
        self.seen: set[str] = set(known)

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER_LABEL
        self.seen.add(value)
        return value
