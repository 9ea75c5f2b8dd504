"""write_within and end_within (gateway/web/limits.py) against a real client that sends its
request and never reads: every write, and the end of the answer too, gives up after the
deadline instead of waiting on the client for good."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from gateway.errors import ClientTooSlow
from gateway.web.limits import bound_send_buffer, end_within, write_within

TIMEOUT = 0.3
pytestmark = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])

Body = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def run_on(loop: str, main: Coroutine[Any, Any, str]) -> str:
    return uvloop.run(main) if loop == "uvloop" else asyncio.run(main)


async def never_reading_client(body: Body) -> str:
    """Serve one stream whose handler runs `body`; a client that never reads asks for it.
    Returns what the handler ended with."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        bound_send_buffer(request.transport)
        await out.prepare(request)
        started = time.monotonic()
        try:
            await body(request, out)
            outcome.set_result("finished")
        except ClientTooSlow:
            outcome.set_result(f"dropped after {time.monotonic() - started:.1f}s")
        return out

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return await asyncio.wait_for(outcome, 20 * TIMEOUT)
    finally:
        client.close()
        await runner.cleanup()


async def steady(transport: asyncio.Transport) -> int:
    """The transport's buffered bytes once the kernel has taken all it will."""
    last, same = -1, 0
    while same < 5:
        await asyncio.sleep(0.02)  # poll until the size stops moving
        size = transport.get_write_buffer_size()
        same, last = (same + 1 if size == last else 0), size
    return last


def test_events_to_a_client_that_never_reads_are_given_up_after_the_deadline(loop: str) -> None:
    async def events(request: web.Request, out: web.StreamResponse) -> None:
        for _ in range(100_000):
            await write_within(request, out, b"data: " + b"x" * 200 + b"\n\n", TIMEOUT)

    assert run_on(loop, never_reading_client(events)).startswith("dropped after 0.")


def test_the_end_of_an_answer_is_given_up_after_the_deadline_too(loop: str) -> None:
    async def fill_then_end(request: web.Request, out: web.StreamResponse) -> None:
        transport = request.transport
        assert transport is not None
        while transport.get_write_buffer_size() == 0:
            await write_within(request, out, b"x" * 4096, TIMEOUT)
            await asyncio.sleep(0)  # let the kernel take what it will
        size = await steady(transport)
        high = transport.get_write_buffer_limits()[1]
        # Leave the buffer two bytes under its high-water mark once the chunk framing
        # ("<hex>\r\n" ... "\r\n") is counted: the end's terminator alone then pauses it.
        n = high - 2 - size
        while n + len(f"{n:x}") + 4 > high - 2 - size:
            n -= 1
        await write_within(request, out, b"y" * n, TIMEOUT)
        assert not request.protocol.writing_paused
        await end_within(request, out, TIMEOUT)

    assert run_on(loop, never_reading_client(fill_then_end)).startswith("dropped after 0.")
