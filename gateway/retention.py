"""`retention.days`: prune in the background, one small batch per writer task, so spans keep
flowing between batches and no replica ever holds the store long."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.web.state import GATEWAY
from store.errors import StoreBusy
from store.retention import prune_batch, reclaim

log = logging.getLogger("spangate.retention")
NS_PER_DAY = 86_400 * 10**9


async def prune_once(app: web.Application) -> dict[str, int]:
    """One pass: batches through the writer until nothing older than the window is left."""
    gw = app[GATEWAY]
    settings = gw.settings.retention
    assert settings.days is not None
    cutoff = time.time_ns() - int(settings.days * NS_PER_DAY)
    total: dict[str, int] = {}
    while True:
        counts = await gw.writer.execute(
            lambda db: prune_batch(db, cutoff_ns=cutoff, batch=settings.batch_size)
        )
        for table, count in counts.items():
            total[table] = total.get(table, 0) + count
        if not any(counts.values()):
            break
    if any(total.values()):
        # The freed pages go back to the file system a few MB per writer task.
        while await gw.writer.execute(reclaim):
            pass
    return total


async def _loop(app: web.Application) -> None:
    interval = app[GATEWAY].settings.retention.interval
    while True:
        try:
            removed = await prune_once(app)
            if any(removed.values()):
                log.info("retention pruned %s", removed)
        except StoreBusy as exc:
            log.warning("retention pass skipped: %s", exc)
        except Exception:
            log.exception("retention pass failed (tried again next interval)")
        await asyncio.sleep(interval)


async def retention(app: web.Application) -> AsyncIterator[None]:
    """A `cleanup_ctx`: the pruning task runs only when `retention.days` is set."""
    task = None
    if app[GATEWAY].settings.retention.days is not None:
        task = asyncio.create_task(_loop(app))
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
