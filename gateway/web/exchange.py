"""One proxied request as the OpenAI routes see it, whichever HTTP server took it: aiohttp's
(`AiohttpExchange`, here) or the front's (`gateway/web/front.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aiohttp import web
from multidict import MultiMapping

from gateway.web.bodies import read_body
from gateway.web.limits import bound_send_buffer, end_within, write_within
from gateway.web.state import GATEWAY, Gateway


class Exchange(Protocol):
    """The request's parts the proxy reads, and the way a streamed answer goes back (a whole
    answer is returned to the server as a `Plain`)."""

    gw: Gateway
    method: str
    path: str
    match_info: Mapping[str, str]
    headers: MultiMapping[str]

    async def body(self, timeout: float) -> bytes:
        """The whole body, decoded; `RequestTimeout` past `timeout`, 413 past the size limit."""
        ...

    def client_gone(self) -> bool: ...

    async def begin_stream(self, status: int, headers: dict[str, str]) -> None: ...

    async def send(self, data: bytes, timeout: float) -> None:
        """Write `data`; `ClientTooSlow` when the client reads none of it for `timeout`."""
        ...

    async def end(self, timeout: float) -> None: ...


class AiohttpExchange:
    __slots__ = ("gw", "headers", "match_info", "method", "path", "request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.gw = request.app[GATEWAY]
        self.method, self.path = request.method, request.path
        self.match_info: Mapping[str, str] = request.match_info
        self.headers: MultiMapping[str] = request.headers
        # The streamed answer, once begun: the handler returns it to aiohttp.
        self.response: web.StreamResponse | None = None

    async def body(self, timeout: float) -> bytes:
        return await read_body(self.request, timeout)

    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def begin_stream(self, status: int, headers: dict[str, str]) -> None:
        out = web.StreamResponse(status=status, headers=headers)
        bound_send_buffer(self.request.transport)
        await out.prepare(self.request)
        self.response = out

    async def send(self, data: bytes, timeout: float) -> None:
        assert self.response is not None
        await write_within(self.request, self.response, data, timeout)

    async def end(self, timeout: float) -> None:
        assert self.response is not None
        await end_within(self.request, self.response, timeout)
