"""Runs the app until SIGTERM/SIGINT: stop accepting, finish in-flight calls, drain, exit."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from config.models import Settings
from gateway.app import create_app
from gateway.state import GATEWAY

log = logging.getLogger("spangate")


async def serve(settings: Settings, db_path: str | Path, *, ready_message: bool = True) -> None:
    app = create_app(settings, db_path)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, settings.server.host, settings.server.port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await site.start()
        host, port = settings.server.host, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        app[GATEWAY].base_url = f"http://{_connectable(host)}:{port}"
        if ready_message:
            names = ", ".join(group.name for group in settings.models)
            print(
                f"spangate listening on http://{host}:{port}  (db: {db_path}; models: {names})",
                file=sys.stderr,
                flush=True,
            )
        await stop.wait()
        print(
            "spangate: stopping; finishing in-flight calls and draining the recorder",
            file=sys.stderr,
            flush=True,
        )
    finally:
        # Closes the listener, waits for in-flight handlers, then runs cleanup (writer drains last).
        await runner.cleanup()


def _connectable(host: str) -> str:
    """An address this process can call itself on."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def run(settings: Settings, db_path: str | Path) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(settings, db_path))
    else:
        uvloop.run(serve(settings, db_path))
