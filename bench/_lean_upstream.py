"""An upstream that costs next to no CPU: a canned chat completion after `--latency`, served by
httptools on uvloop (`bench/cpu_per_call.py --upstream lean`).

tests/fake_provider.py is aiohttp and checks every request like OpenAI would; on a slow day it
takes a whole core at ~1,200 calls a second, and a gateway that is faster than that is never
saturated, so its CPU per call counts the wake-ups of a loop that waits. This one answers
every POST alike (a plain completion with usage; no streams) and GET /v1/models.

    python bench/_lean_upstream.py --host 127.0.0.1 --port N [--latency 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import httptools
import orjson
import uvloop

MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]})


def completion() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-lean",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "bench-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        }
    )


def answer(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Upstream(asyncio.Protocol):
    def __init__(self, latency: float, canned: bytes) -> None:
        self.latency, self.canned = latency, canned
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        reply = answer(MODELS) if self.parser.get_method() == b"GET" else self.canned
        if self.latency:
            asyncio.get_running_loop().call_later(self.latency, self._send, reply)
        else:
            self._send(reply)

    def _send(self, reply: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)


async def main(host: str, port: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    canned = answer(completion())
    server = await loop.create_server(lambda: Upstream(latency, canned), host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.latency))
