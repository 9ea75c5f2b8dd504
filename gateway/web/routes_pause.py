"""`/api/proxy/pause`, `/resume`, `/state`: a trainer holds or refuses model calls while it
syncs weights, and watches calls in flight drain to zero first (gateway/proxy/gate.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.proxy.gate import Gate
from gateway.web import api_models as m
from gateway.web.routes_api import ApiRoute, body_of, json, write
from gateway.web.state import GATEWAY
from store.proxy_state import load_pause, save_pause

log = logging.getLogger("spangate.pause")


@dataclass
class LocalChanges:
    """Pauses and resumes this replica took itself: a read of the store begun before one may
    predate it, so applying it would undo the change (a trainer told `paused: true` while
    calls still go upstream)."""

    count: int = 0


LOCAL_CHANGES = web.AppKey("pause_local_changes", LocalChanges)


async def pause(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.PauseRequest)
    retry_after = body.retry_after_seconds
    if retry_after is None:
        retry_after = gw.settings.pause.retry_after_seconds
    state = {"paused": True, "mode": body.mode, "reason": body.reason, "retry_after": retry_after}
    # Stored first, so every replica (each reads it every `shared.sync_seconds`) follows.
    await write(gw, lambda db: save_pause(db, state))
    gw.gate.pause(reason=body.reason, mode=body.mode, retry_after=retry_after)
    request.app[LOCAL_CHANGES].count += 1
    return json(gw.gate.state())


async def resume(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await write(gw, lambda db: save_pause(db, {"paused": False}))
    gw.gate.resume()
    request.app[LOCAL_CHANGES].count += 1
    return json(gw.gate.state())


def apply_pause(gate: Gate, stored: dict[str, Any] | None) -> None:
    """Make this replica's gate say what the store says."""
    if stored is None:
        return
    if stored["paused"]:
        wanted = (stored["mode"], stored["reason"], stored["retry_after"])
        if not gate.paused or (gate.mode, gate.reason, gate.retry_after) != wanted:
            gate.pause(
                reason=stored["reason"], mode=stored["mode"], retry_after=stored["retry_after"]
            )
    elif gate.paused:
        gate.resume()


async def pause_sync(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: follow the stored pause state, so a pause sent to any replica holds on
    every one (and a restarted replica comes back paused if the trainer left it so)."""
    gw = app[GATEWAY]
    app[LOCAL_CHANGES] = changes = LocalChanges()

    async def follow() -> None:
        while True:
            try:
                before = changes.count
                stored = await gw.reader.run(load_pause)
                if changes.count == before:
                    apply_pause(gw.gate, stored)
            except Exception:
                log.exception("reading the pause state failed; trying again")
            await asyncio.sleep(gw.settings.shared.sync_seconds)

    task = asyncio.get_running_loop().create_task(follow())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def state(request: web.Request) -> web.Response:
    return json(request.app[GATEWAY].gate.state())


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("POST", "/api/proxy/pause", pause, "Hold or reject new model calls", "admin", m.PauseRequest, None, m.ProxyState, 200, (403, 422)),
    ApiRoute("POST", "/api/proxy/resume", resume, "Let model calls go again", "admin", None, None, m.ProxyState, 200, (403,)),
    ApiRoute("GET", "/api/proxy/state", state, "Paused or not, and model calls in flight", "read", None, None, m.ProxyState, 200, ()),
)  # fmt: skip
