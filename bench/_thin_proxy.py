"""The thinnest aiohttp pass-through (bench/vs_litellm.py's *aiohttp floor*): what an
aiohttp-in, aiohttp-out hop costs before a gateway does anything of its own.

One route, one shared ClientSession, no parsing, no recording, no metrics; a stream is relayed
chunk by chunk as it arrives. uvloop, no access log, as `spangate serve` runs. With `own`, the
upstream client is spangate's (gateway/providers/http1.py) instead: aiohttp's server alone
(bench/hop_floors.py's *aiohttp hop*).

    python bench/_thin_proxy.py PORT UPSTREAM_V1_BASE [own]
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def make_own_client_app(upstream: str) -> web.Application:
    """The same route in front of spangate's own upstream client."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gateway.providers.http1 import ConnectionPool, parse_target

    app = web.Application()
    pool_key = web.AppKey("pool", ConnectionPool)
    target = parse_target(upstream + "/chat/completions")

    async def open_pool(app: web.Application) -> None:
        app[pool_key] = ConnectionPool()

    async def close_pool(app: web.Application) -> None:
        await app[pool_key].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: request.headers[k] for k in KEEP if k in request.headers}
        answer = await app[pool_key].request(
            "POST", target, headers=headers, body=body, total=60.0, connect=10.0
        )
        content_type = answer.header("content-type", "application/json")
        try:
            if content_type.startswith("text/event-stream"):
                out = web.StreamResponse(
                    status=answer.status, headers={"Content-Type": content_type}
                )
                await out.prepare(request)
                async for chunk in answer.iter_chunks():
                    await out.write(chunk)
                await out.write_eof()
                return out
            data = await answer.read(1 << 24)
        finally:
            answer.release()
        return web.Response(status=answer.status, body=data, headers={"Content-Type": content_type})

    app.on_startup.append(open_pool)
    app.on_cleanup.append(close_pool)
    app.router.add_post("/v1/chat/completions", relay)
    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    own = sys.argv[3:] == ["own"]
    uvloop.install()
    app = make_own_client_app(upstream) if own else make_app(upstream)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
