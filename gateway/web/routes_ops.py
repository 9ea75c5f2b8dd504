"""Operations routes: liveness and readiness for orchestrators, and the Prometheus scrape."""

from __future__ import annotations

from aiohttp import web

from gateway.web.metrics import metrics_view
from gateway.web.state import GATEWAY


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    writer = gw.writer
    problems = writer.problems()
    # The groups served now: the config's, with those added or removed over /api/models.
    groups = list(gw.router.groups.values())
    if not groups:
        problems.append("no model groups configured")
    for group in groups:
        if not gw.router.usable(group):
            problems.append(f"model group {group.name!r} has no usable deployment (breakers open)")
    body = {
        "status": "ready" if not problems else "not_ready",
        "problems": problems,
        "recorder": {
            "queue_depth": writer.depth,
            "written": writer.written,
            "spilled": writer.spilled,
            "replayed": writer.replayed,
            "held_in_memory": writer.held,
            "memory_buffer": writer.memory_buffer,
            "quarantined": writer.quarantined,
            "dead_letter_file": str(writer.dead_letters.path) if writer.quarantined else None,
            "lost": writer.lost,
            "writer_faults": writer.faults,
            "writer_restarts": writer.restarts,
            "max_unsaved_seconds": writer.max_unsaved_seconds,
        },
    }
    return web.json_response(body, status=200 if not problems else 503)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics_view)
