"""Runs the app until SIGTERM/SIGINT: stop accepting, finish in-flight calls, drain, exit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from config.models import Settings
from gateway.compose import create_app
from gateway.web.front import start_front
from gateway.web.routes_api import close_streams
from gateway.web.state import GATEWAY
from store.backend import mask_url

log = logging.getLogger("spangate")

# Seconds handlers still running when `shutdown_timeout` is up get to unwind once cancelled;
# the graceful wait itself is `_finish_in_flight`, so aiohttp's own wait adds only this.
CANCEL_GRACE = 2.0

# With the default (700, 10, 10) a young collection ran about once a call and the older
# ones kept re-walking everything loaded at startup: 13-17% of the CPU per call and half
# the p99 at concurrency 64 (bench/results/cpu_per_call-notes.md, "Garbage collector").
GC_THRESHOLDS = (50_000, 20, 100)


def settle_heap() -> None:
    """Move what startup allocated out of the collector's sight and collect less often.

    Frozen objects are never traversed again; cycles made while serving are still found.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def runner_options(settings: Settings) -> dict[str, Any]:
    """`web.AppRunner` keyword arguments that bound what a client can hold.

    - `keepalive_timeout`: aiohttp closes a connection still waiting for a whole request
      this long after it opened or was last answered, which bounds a client that sends its
      headers a byte at a time (slowloris) as well as idle keep-alive connections.
    - `handler_cancellation`: a client that goes away cancels its handler, so a call waiting
      on its upstream stops at once and its span says the client left (499).
    """
    return {
        "keepalive_timeout": settings.server.header_timeout,
        "handler_cancellation": True,
        "shutdown_timeout": CANCEL_GRACE,
    }


async def serve(settings: Settings, db_path: str | Path, *, ready_message: bool = True) -> None:
    app = create_app(settings, db_path)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **runner_options(settings))
    await runner.setup()
    settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = await listen(runner, settings, settings.server.host, settings.server.port)
        host, port = settings.server.host, runner.addresses[0][1]
        app[GATEWAY].base_url = f"http://{_connectable(host)}:{port}"
        if ready_message:
            names = ", ".join(group.name for group in settings.models)
            print(
                f"spangate listening on http://{_url_host(host)}:{port}  "
                f"(db: {mask_url(str(db_path))}; models: {names})",
                file=sys.stderr,
                flush=True,
            )
        await stop.wait()
        print(
            "spangate: stopping; finishing in-flight calls and draining the recorder",
            file=sys.stderr,
            flush=True,
        )
        await _finish_in_flight(app, site, settings.server.shutdown_timeout)
    finally:
        # Closes the listener, waits for in-flight handlers, then runs cleanup (writer drains last).
        await runner.cleanup()


async def listen(
    runner: web.AppRunner, settings: Settings, host: str, port: int, grace: float = CANCEL_GRACE
) -> web.TCPSite:
    """Start listening: on the front (`gateway/web/front.py`) unless `server.front` asks for
    aiohttp alone. `grace` is what calls still running at shutdown get before they are
    cancelled (the runner's `shutdown_timeout` for aiohttp's own)."""
    if settings.server.front == "httptools":
        return await start_front(runner, host, port, grace=grace, backlog=1024, reuse_address=True)
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return site


async def _finish_in_flight(app: web.Application, site: web.TCPSite, timeout: float) -> None:
    """Stop accepting, then let calls already accepted finish, bodies still arriving included.

    aiohttp's own shutdown stops reading from open connections at once, which would drop
    a call whose body had not fully arrived; so the listener closes first and the calls
    in flight get up to `timeout` before aiohttp's shutdown runs.
    """
    await site.stop()
    close_streams(app)
    gw = app[GATEWAY]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await gw.idle.wait()


def _connectable(host: str) -> str:
    """An address this process can call itself on."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return _url_host(host)


def _url_host(host: str) -> str:
    """The host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def run(settings: Settings, db_path: str | Path) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(settings, db_path))
    else:
        uvloop.run(serve(settings, db_path))
