"""The thinnest aiohttp pass-through (bench/vs_litellm.py's *aiohttp floor*): what an
aiohttp-in, aiohttp-out hop costs before a gateway does anything of its own.

One route, one shared ClientSession, no parsing, no recording, no metrics; a stream is relayed
chunk by chunk as it arrives. uvloop, no access log, as `spangate serve` runs.

    python bench/_thin_proxy.py PORT UPSTREAM_V1_BASE
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

# Sent on: what the provider needs to answer; everything else stays behind.
KEEP = ("Content-Type", "Authorization")


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def open_session(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession()

    async def close_session(app: web.Application) -> None:
        await app[session_key].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: request.headers[k] for k in KEEP if k in request.headers}
        url = upstream + "/chat/completions"
        async with app[session_key].post(url, data=body, headers=headers) as upstream_response:
            content_type = upstream_response.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                out = web.StreamResponse(
                    status=upstream_response.status, headers={"Content-Type": content_type}
                )
                await out.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
            return web.Response(
                status=upstream_response.status,
                body=await upstream_response.read(),
                headers={"Content-Type": content_type},
            )

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/v1/chat/completions", relay)
    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    uvloop.install()
    web.run_app(make_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
