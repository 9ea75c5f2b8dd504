"""Reading a request's body off the wire: its encoding checked, its arrival time bounded."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.errors import RequestTimeout, UnreadableBody


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The body, decoded as its `Content-Encoding` says: 400 when it is not so encoded, 408
    when the client takes longer than `timeout` to send it.

    aiohttp bounds the size (`client_max_size`) but not the time: without the deadline, a
    client sending a byte a second holds a handler (and graceful shutdown) for as long as it
    likes.
    """
    try:
        if request.content.is_eof():
            # The whole body is here already (the usual small one): no deadline to arm.
            return await request.read()
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g}s (server.body_timeout)"
        ) from exc
    except web.RequestPayloadError as exc:
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(
            f"the request body could not be read as Content-Encoding {encoding!r}: "
            "send it encoded as declared, or without Content-Encoding"
        ) from exc
