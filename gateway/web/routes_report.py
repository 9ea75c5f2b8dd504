"""`GET /api/rollouts/{rollout_id}/report`: a rollout as one self-contained HTML file."""

from __future__ import annotations

from aiohttp import web

from gateway.web.report import build_report
from gateway.web.routes_api import ApiRoute, read
from gateway.web.state import GATEWAY

# The report needs nothing from anywhere: say so to the browser too.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


async def report_view(request: web.Request) -> web.Response:
    rollout_id = request.match_info["rollout_id"]
    # Rendered on a read thread with the read: a long rollout's report stays off the loop.
    html = await read(request.app[GATEWAY], build_report, rollout_id)
    filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in rollout_id)[:100]
    return web.Response(
        text=html,
        content_type="text/html",
        headers={
            "Content-Disposition": f'inline; filename="rollout-{filename}.html"',
            "Content-Security-Policy": REPORT_CSP,
            "X-Content-Type-Options": "nosniff",
            # Every message of the rollout: no shared or browser cache keeps a copy.
            "Cache-Control": "no-store",
        },
    )


ROUTES = (
    ApiRoute("GET", "/api/rollouts/{rollout_id}/report", report_view, "The rollout as one self-contained HTML file", "read", None, None, None, 200, (404,)),
)  # fmt: skip
