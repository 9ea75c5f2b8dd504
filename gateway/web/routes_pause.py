"""`/api/proxy/pause`, `/resume`, `/state`: a trainer holds or refuses model calls while it
syncs weights, and watches calls in flight drain to zero first (gateway/proxy/gate.py)."""

from __future__ import annotations

from aiohttp import web

from gateway.web import api_models as m
from gateway.web.routes_api import ApiRoute, body_of, json
from gateway.web.state import GATEWAY


async def pause(request: web.Request) -> web.Response:
    gate = request.app[GATEWAY].gate
    body = await body_of(request, m.PauseRequest)
    gate.pause(reason=body.reason, mode=body.mode, retry_after=body.retry_after_seconds)
    return json(gate.state())


async def resume(request: web.Request) -> web.Response:
    gate = request.app[GATEWAY].gate
    gate.resume()
    return json(gate.state())


async def state(request: web.Request) -> web.Response:
    return json(request.app[GATEWAY].gate.state())


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("POST", "/api/proxy/pause", pause, "Hold or reject new model calls", "admin", m.PauseRequest, None, m.ProxyState, 200, (403, 422)),
    ApiRoute("POST", "/api/proxy/resume", resume, "Let model calls go again", "admin", None, None, m.ProxyState, 200, (403,)),
    ApiRoute("GET", "/api/proxy/state", state, "Paused or not, and model calls in flight", "read", None, None, m.ProxyState, 200, ()),
)  # fmt: skip
