"""Bounds on what a client or an upstream can make the gateway wait for or hold in memory.

Each helper turns one unbounded operation (a body read, a write to a client, an upstream
stream, a stored body, a metric label) into one with a configured limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from gateway.errors import ClientTooSlow

OTHER_LABEL = "other"
# Kernel send buffer of a streamed answer's socket. Left to autotuning it grows to megabytes,
# which a client that stops reading pins for every stream; tokens need far less.
STREAM_SEND_BUFFER = 64 * 1024


async def write_within(
    request: web.Request, response: web.StreamResponse, data: bytes, timeout: float
) -> None:
    """`response.write(data)`, dropping the client if it stops reading for `timeout` seconds.

    aiohttp's write waits for the socket to drain with no deadline, so a client that never
    reads would hold its handler, its upstream stream and its buffers forever. The bytes are
    handed to the transport at once; only a client that is behind (the transport paused) is
    waited for, under the deadline, so the usual write of a stream event sets no timer.
    """
    writer = request.writer
    if isinstance(writer, StreamWriter) and response.prepared:
        await writer.write(data, drain=False)  # never waits
        if not request.protocol.writing_paused:
            return
        await within(request.transport, writer.drain(), timeout)
    else:
        await within(request.transport, response.write(data), timeout)


async def end_within(request: web.Request, response: web.StreamResponse, timeout: float) -> None:
    """`response.write_eof()` under the same deadline: aiohttp drains after the last bytes with
    none, and a client that stopped reading just then would hold the handler for good."""
    await within(request.transport, response.write_eof(), timeout)


async def within(transport: Any, waiting: Awaitable[None], timeout: float) -> None:
    """Wait for a client to take what was written, dropping it after `timeout` seconds
    (`ClientTooSlow`)."""
    try:
        async with asyncio.timeout(timeout):
            await waiting
    except TimeoutError as exc:
        if transport is not None:
            # Frees the kernel and transport buffers now rather than at some later close.
            transport.abort()
        raise ClientTooSlow(f"the client read nothing for {timeout:g}s") from exc


def bound_send_buffer(transport: Any) -> None:
    """Cap the kernel memory a client that stops reading can pin, before a stream starts."""
    sock = transport.get_extra_info("socket") if transport else None
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)


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
