"""The thinnest Python hop there is here (bench/hop_floors.py's *bare hop*): uvloop, an
httptools request parser and spangate's own upstream client, with nothing else between them.

No routing, no middleware, no parsing of the body, no recording: what a call costs a Python
gateway on this machine before any gateway work, aiohttp's server included in none of it.
Plain answers only (the benchmark sends no streams); keep-alive on both sides.

    python bench/_bare_hop.py PORT UPSTREAM_CHAT_COMPLETIONS_URL
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.providers.http1 import ConnectionPool, Target, parse_target

# Sent on: what the provider needs to answer; everything else stays behind.
KEEP = {b"content-type": "Content-Type", b"authorization": "Authorization"}
MAX_BODY = 16 * 1024 * 1024


class Hop(asyncio.Protocol):
    """One client connection: each whole request goes upstream, its answer comes back."""

    def __init__(self, pool: ConnectionPool, upstream: Target) -> None:
        self.pool, self.upstream = pool, upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        # The loop keeps only weak references to tasks: a relay in flight is held here.
        self.relays: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's, which is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        kept = KEEP.get(name.lower())
        if kept is not None:
            self.headers[kept] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, headers = b"".join(self.body), self.headers
        self.body, self.headers = [], {}
        relay = asyncio.ensure_future(self.relay(headers, body))
        self.relays.add(relay)
        relay.add_done_callback(self.relays.discard)

    async def relay(self, headers: dict[str, str], body: bytes) -> None:
        answer = await self.pool.request(
            "POST", self.upstream, headers=headers, body=body, total=60.0, connect=10.0
        )
        data = await answer.read(MAX_BODY)
        answer.release()
        content_type = answer.header("content-type", "application/json")
        head = (
            f"HTTP/1.1 {answer.status} OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode("latin-1") + data)


async def serve(port: int, upstream: str) -> None:
    pool = ConnectionPool()
    target = parse_target(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Hop(pool, target), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))


if __name__ == "__main__":
    main()
