"""A minimal OpenAI-compatible streaming upstream that stamps every chunk with its send time.

Used by bench/streaming.py to prove that the gateway forwards chunks as they arrive: each
`chat.completion.chunk` carries `"x_sent_ns"`, the CLOCK_MONOTONIC time (time.monotonic_ns,
the same clock in every process on the machine) taken just before the chunk is written. A
client that notes its own monotonic time on arrival gets each chunk's transit time, direct
or through the gateway, without the jitter of the upstream's own timers.

    python bench/_stamped_upstream.py --port N [--chunks 20] [--delay 0.05]

Streams `--chunks` content chunks with `--delay` seconds before every event after the first
(role chunk, content, finish, usage when asked, [DONE]). Non-streaming requests get a plain
completion. GET /v1/models answers so readiness probes work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import orjson
from aiohttp import web

MODEL = "stamped-model"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stamped",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def make_app(chunks: int, delay: float) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        usage = {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(f"w{i}" for i in range(chunks))}
            return web.json_response(
                {
                    "id": "chatcmpl-stamped",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": MODEL,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
                dumps=lambda v: orjson.dumps(v).decode(),
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        events: list[dict[str, Any] | None] = [chunk({"role": "assistant", "content": ""}, **extra)]
        events += [chunk({"content": f" w{i}"}, **extra) for i in range(chunks)]
        events.append(chunk({}, "stop", **extra))
        if include_usage:
            events.append({**chunk({}), "choices": [], "usage": usage})
        events.append(None)  # [DONE]
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(request)
        for index, event in enumerate(events):
            if index and delay:
                await asyncio.sleep(delay)
            if event is None:
                await resp.write(b"data: [DONE]\n\n")
            else:
                event["x_sent_ns"] = time.monotonic_ns()
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(
            make_app(args.chunks, args.delay), access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"stamped upstream on http://{args.host}:{args.port}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
