"""The `/ui` pages: server-rendered from the store's read layer, live through the span stream.

Each page is a plain GET with its state in the query string, so every view has a URL to share.
An htmx request (`HX-Request`) gets the page body without the frame, for partial updates.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import orjson
from aiohttp import web
from sqlite_utils import Database

from config.models import DEFAULT_MIN_SUPPORT, DEFAULT_REWARD_NAME, DEFAULT_SUCCESS_THRESHOLD
from gateway.errors import GatewayError
from gateway.web import auth
from gateway.web.routes_api import read, time_param
from gateway.web.routes_experiments import ANALYSIS as EXPERIMENT_ANALYSIS
from gateway.web.state import GATEWAY
from gateway.web.ui import views
from store import dashboard, queries
from store.errors import NotFound, StoreError
from store.queries import get_rollout
from store.schema import ROLLOUT_STATUSES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Every page, declared beside its handler; `add_ui_routes` puts them on an app.
PAGES = web.RouteTableDef()

# The pages load scripts and styles only from this origin; inline styles position the bars.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600, "7d": 7 * 86400}
DEFAULT_WINDOW = "24h"
CHART_BUCKETS = 60
ROLLOUTS_PAGE = 50
RECENT_ROLLOUTS = 10
LIVE_KEEP = 500
MAX_GUIDELINE_AGENTS = 20
ROLLOUT_COLUMNS = (
    (None, "rollout", False),
    (None, "status", False),
    (None, "agent", False),
    ("calls", "calls", True),
    ("errors", "errors", True),
    ("tokens", "tokens", True),
    ("cost", "cost", True),
    ("duration", "duration", True),
    ("reward", "reward", True),
    ("created", "created", False),
)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def _signed_in(request: web.Request) -> bool:
    return bool(request.app[GATEWAY].settings.auth.keys) and auth.UI_COOKIE in request.cookies


def render(
    request: web.Request, template: str, http_status: int = 200, **context: Any
) -> web.Response:
    context.setdefault("page", "")
    context.update(_frame(request))
    return _html(views.render(template, **context), http_status)


def page(fn: Handler) -> Handler:
    """Failures as an HTML page, not the API's JSON: a person is reading this."""

    @wraps(fn)
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except NotFound as exc:
            return render(request, "error.html", 404, status=404, message=str(exc))
        except GatewayError as exc:
            return render(request, "error.html", exc.status, status=exc.status, message=str(exc))
        except StoreError as exc:
            return render(request, "error.html", 500, status=500, message=str(exc))

    return handler


def _param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name, "").strip()
    return value or None


def _float(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.query.get(name, default))
    except ValueError:
        return default


# -- overview ---------------------------------------------------------------------------


def _overview(db: Database, since_ns: int, until_ns: int) -> dict[str, Any]:
    series = dashboard.timeseries(db, since_ns=since_ns, until_ns=until_ns, buckets=CHART_BUCKETS)
    stats = queries.stats(db, since_ns=since_ns)
    rewards = dashboard.reward_values(db, since_ns=since_ns)
    recent = dashboard.browse_rollouts(db, limit=RECENT_ROLLOUTS).data
    durations = [s for s in series if s["calls"]]
    # The window's percentiles, weighted by calls per bucket: close enough for a headline.
    weighted = sorted((s["p50_ms"], s["calls"]) for s in durations if s["p50_ms"] is not None)
    p95s = sorted((s["p95_ms"], s["calls"]) for s in durations if s["p95_ms"] is not None)
    return {
        "series": series,
        "stats": stats,
        "rewards": rewards,
        "recent": recent,
        "latency": {"p50": _weighted_median(weighted), "p95": _weighted_median(p95s)},
    }


def _weighted_median(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in pairs)
    seen = 0
    for value, weight in pairs:
        seen += weight
        if seen * 2 >= total:
            return value
    return None


@PAGES.get("/ui/")
@page
async def overview(request: web.Request) -> web.Response:
    window = request.query.get("window", DEFAULT_WINDOW)
    if window not in WINDOWS:
        window = DEFAULT_WINDOW
    until_ns = time.time_ns()
    since_ns = until_ns - WINDOWS[window] * 1_000_000_000
    data = await read(request.app[GATEWAY], _overview, since_ns, until_ns)
    series = data["series"]
    chart = {
        "t": [s["start_ns"] / 1e9 for s in series],
        **{
            key: [s[key] for s in series]
            for key in ("calls", "errors", "p50_ms", "p95_ms", "tokens", "cost_usd")
        },
    }
    stats = data["stats"]
    return render(
        request,
        "overview.html",
        page="overview",
        window=window,
        windows=list(WINDOWS),
        totals=stats["totals"],
        latency=data["latency"],
        rollouts_by_status=stats["rollouts_by_status"],
        rollouts_total=sum(stats["rollouts_by_status"].values()),
        histogram=views.histogram(data["rewards"]),
        reward_count=len(data["rewards"]),
        # `</` cannot close the script element that holds the JSON.
        series_json=orjson.dumps(chart).decode().replace("</", "<\\/"),
        **_rollout_table(data["recent"]),
    )


# -- rollouts ---------------------------------------------------------------------------


def _rollout_table(
    rows: list[dict[str, Any]],
    sort: str = "created",
    descending: bool = True,
    sort_link: Callable[[str], str] | None = None,
    *,
    filtered: bool = False,
) -> dict[str, Any]:
    """What `rollout_rows.html` shows: the rows, sorted as said; without `sort_link` the
    headings are plain text (the overview's recent rollouts)."""
    return {
        "rollouts": rows,
        "columns": ROLLOUT_COLUMNS,
        "sort": sort,
        "descending": descending,
        "sort_link": sort_link,
        "filtered": filtered,
    }


ROLLOUT_FILTERS = ("status", "agent", "tag", "model", "q", "since", "until")


@PAGES.get("/ui/rollouts")
@page
async def rollouts(request: web.Request) -> web.Response:
    f = {name: _param(request, name) for name in ROLLOUT_FILTERS}
    sort = request.query.get("sort", "created")
    if sort not in dashboard.BROWSE_SORTS:
        sort = "created"
    descending = request.query.get("dir", "desc") != "asc"
    cursor = _param(request, "cursor")
    error = None
    status = f["status"] if f["status"] in ROLLOUT_STATUSES else None
    result = queries.Page([], None)
    try:
        result = await read(
            request.app[GATEWAY],
            dashboard.browse_rollouts,
            status=status,
            agent=f["agent"],
            tag=f["tag"],
            model=f["model"],
            text=f["q"],
            since_ns=time_param(f["since"], "since"),
            until_ns=time_param(f["until"], "until"),
            sort=sort,
            descending=descending,
            cursor=cursor,
            limit=ROLLOUTS_PAGE,
        )
    except GatewayError as exc:
        error = str(exc)
    base = {k: v for k, v in f.items() if v}

    def link(**extra: str) -> str:
        return "/ui/rollouts?" + urllib.parse.urlencode({**base, **extra})

    def sort_link(key: str) -> str:
        flip = sort == key and descending
        return link(sort=key, dir="asc" if flip else "desc")

    return render(
        request,
        "rollouts.html",
        page="rollouts",
        f=f,
        statuses=ROLLOUT_STATUSES,
        cursor=cursor,
        error=error,
        next_link=(
            link(sort=sort, dir="desc" if descending else "asc", cursor=result.next_cursor)
            if result.next_cursor
            else None
        ),
        first_link=link(sort=sort, dir="desc" if descending else "asc"),
        **_rollout_table(result.data, sort, descending, sort_link, filtered=bool(base)),
    )


def rollout_page(
    db: Database, rollout_id: str, *, budget: list[dict[str, Any]], **frame: Any
) -> str:
    """Read, shape and render one rollout's page; run whole on a read thread, as a rollout of
    thousands of spans takes a while to render and must not hold the event loop."""
    r = get_rollout(db, rollout_id, bodies=False)
    plain, verdicts = views.split_rewards(r["rewards"])
    return views.render(
        "rollout.html",
        page="rollouts",
        r=r,
        summary=r["summary"],
        tl=views.timeline(views.rollout_spans(r)),
        rewards=plain,
        verdicts=verdicts,
        criteria=views.criteria,
        rationale=views.rationale,
        budget=budget,
        **frame,
    )


def _frame(request: web.Request) -> dict[str, Any]:
    return {
        "partial": request.headers.get("HX-Request") == "true",
        "signed_in": _signed_in(request),
    }


@PAGES.get("/ui/rollouts/{rollout_id}")
@page
async def rollout(request: web.Request) -> web.Response:
    rollout_id = request.match_info["rollout_id"]
    gw = request.app[GATEWAY]
    budget = views.budget_bars(await gw.budgets.view(rollout_id)) if gw.budgets else []
    return _html(await read(gw, rollout_page, rollout_id, budget=budget, **_frame(request)))


# -- one span ---------------------------------------------------------------------------


@PAGES.get("/ui/spans/{span_id}")
@page
async def span(request: web.Request) -> web.Response:
    s = await read(request.app[GATEWAY], queries.get_span, request.match_info["span_id"])
    s.pop("_rowid", None)
    attributes = s.get("attributes") if isinstance(s.get("attributes"), dict) else {}
    shown = [
        (k, v if isinstance(v, str) else views.pretty_json(v))
        for k, v in sorted(attributes.items())
        if k != "spangate.tries"
    ]
    return render(
        request,
        "span.html",
        page="rollouts",
        s=s,
        messages=views.conversation(s),
        answer=views.reply(s),
        tries=views.tries(s),
        attributes=shown,
    )


# -- leaderboard and patterns -----------------------------------------------------------


@dataclass(frozen=True)
class Analyses:
    """What the leaderboard and patterns pages show, computed by the judge package.

    The composition root supplies it (`gateway/web` never imports `judge`); each function
    takes the read connection first and runs on a read thread.
    """

    patterns: Callable[..., dict[str, Any]]
    leaderboards: Callable[..., dict[str, Any]]
    # (db, agent) -> {"versions": [...], "latest": {...} | None, "diffs": [{old, new, diff}]}
    guidelines: Callable[[Database, str], dict[str, Any]]


ANALYSES = web.AppKey("ui_analyses", Analyses)


def _analyses(request: web.Request) -> Analyses:
    if ANALYSES not in request.app:
        raise NotFound("this gateway was built without the judge's analyses")
    return request.app[ANALYSES]


def _patterns(db: Database, analyses: Analyses, **params: Any) -> dict[str, Any]:
    analysis = analyses.patterns(db, **params)
    agents = [params["agent"]] if params.get("agent") else []
    agents += [row["agent"] for row in analysis["leaderboards"]["agents"] if row.get("agent")]
    guidelines = []
    for agent in list(dict.fromkeys(agents))[:MAX_GUIDELINE_AGENTS]:
        found = analyses.guidelines(db, agent)
        if not found["versions"]:
            continue
        diffs = [
            {
                "old": d["old"],
                "new": d["new"],
                "lines": [_diff_line(x) for x in d["diff"].splitlines()],
            }
            for d in reversed(found["diffs"])
        ]
        guidelines.append(
            {
                "agent": agent,
                "versions": found["versions"],
                "latest": found["latest"],
                "diffs": diffs,
            }
        )
    return {"analysis": analysis, "guidelines": guidelines}


def _diff_line(line: str) -> dict[str, str]:
    if line.startswith(("+++", "---", "@@")):
        kind = "hunk"
    elif line.startswith("+"):
        kind = "add"
    elif line.startswith("-"):
        kind = "del"
    else:
        kind = ""
    return {"kind": kind, "text": line}


def _analysis_filters(request: web.Request) -> dict[str, Any]:
    return {
        "since": _param(request, "since"),
        "agent": _param(request, "agent"),
        "reward_name": _param(request, "reward_name") or DEFAULT_REWARD_NAME,
        "success_threshold": _float(request, "success_threshold", DEFAULT_SUCCESS_THRESHOLD),
    }


def _analysis(f: dict[str, Any]) -> dict[str, Any]:
    """The page's filters as the analysis takes them (leaderboards and patterns alike)."""
    return {
        "since_ns": time_param(f["since"], "since"),
        "agent": f["agent"],
        "reward_name": f["reward_name"],
        "success_threshold": f["success_threshold"],
    }


@PAGES.get("/ui/leaderboard")
@page
async def leaderboard(request: web.Request) -> web.Response:
    f = _analysis_filters(request)
    boards = await read(request.app[GATEWAY], _analyses(request).leaderboards, **_analysis(f))
    return render(
        request,
        "leaderboard.html",
        page="leaderboard",
        f=f,
        boards=[
            ("By model", boards["models"], "model"),
            ("By agent", boards["agents"], "agent"),
        ],
        whisker_scale=views.whisker_scale,
        whisker=views.whisker,
    )


@PAGES.get("/ui/patterns")
@page
async def patterns(request: web.Request) -> web.Response:
    f = _analysis_filters(request)
    try:
        f["min_support"] = max(int(request.query.get("min_support", DEFAULT_MIN_SUPPORT)), 1)
    except ValueError:
        f["min_support"] = DEFAULT_MIN_SUPPORT
    found = await read(
        request.app[GATEWAY],
        _patterns,
        _analyses(request),
        min_support=f["min_support"],
        **_analysis(f),
    )
    return render(
        request,
        "patterns.html",
        page="patterns",
        f=f,
        a=found["analysis"],
        guidelines=found["guidelines"],
    )


@PAGES.get("/ui/experiments")
@page
async def experiments(request: web.Request) -> web.Response:
    """Every experiment: its variants side by side, the tests against control, the verdict."""
    if EXPERIMENT_ANALYSIS not in request.app:
        raise NotFound("this gateway was built without the experiments analysis")
    every = request.app[EXPERIMENT_ANALYSIS].every
    found = await read(request.app[GATEWAY], every)
    return render(request, "experiments.html", page="experiments", experiments=found["data"])


@PAGES.get("/ui/live")
@page
async def live(request: web.Request) -> web.Response:
    f = {"rollout": _param(request, "rollout"), "agent": _param(request, "agent")}
    return render(request, "live.html", page="live", f=f, keep=LIVE_KEEP)


# -- signing in -------------------------------------------------------------------------


def _next(value: str | None) -> str:
    """Only a plain path of ours: a sign-in link must not send anyone to another site, nor
    put a control character into `Location` (aiohttp then drops the whole answer)."""
    if (
        value
        and value.startswith("/ui")
        and not value.startswith("//")
        and not any(c < " " or c == "\x7f" for c in value)
    ):
        return value
    return "/ui/"


def _first(value: str | None) -> str:
    """The first of a header's comma-separated values: the proxy nearest the browser."""
    return (value or "").split(",", 1)[0].strip().lower()


def _forwarded(request: web.Request, name: str) -> str | None:
    """What the proxy in front says of the browser's request (`Forwarded`, then `X-Forwarded-*`).

    Safe to trust here: another site cannot make a browser send these headers, so they give
    it nothing; and the gateway has no TLS listener of its own, so HTTPS means a proxy.
    """
    given = request.forwarded[0].get(name) if request.forwarded else None
    return (given or _first(request.headers.get(f"X-Forwarded-{name}"))).lower() or None


def _over_https(request: web.Request) -> bool:
    return request.secure or _forwarded(request, "proto") == "https"


def _from_another_site(request: web.Request) -> bool:
    """Login CSRF: another site's form must neither sign the browser in (to the other site's
    key) nor out. Browsers say where a request comes from in `Sec-Fetch-Site`, and older ones
    at least send `Origin` on every form POST; of it only the host is compared, as a proxy in
    front may change the scheme (and the host, which it then names in `X-Forwarded-Host`)."""
    fetched_from = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetched_from in ("cross-site", "same-origin"):
        return fetched_from == "cross-site"
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    ours = {request.host.lower(), _forwarded(request, "host")}
    return urllib.parse.urlsplit(origin.strip()).netloc.lower() not in ours


@PAGES.get("/ui/login")
async def login_form(request: web.Request) -> web.Response:
    if not request.app[GATEWAY].settings.auth.keys:
        raise web.HTTPSeeOther("/ui/")
    return render(request, "login.html", next=_next(request.query.get("next")), error=None)


@PAGES.post("/ui/login")
async def login(request: web.Request) -> web.Response:
    keys = request.app[GATEWAY].settings.auth.keys
    if not keys:
        raise web.HTTPSeeOther("/ui/")
    if _from_another_site(request):
        return _refused(request)
    try:
        form = await request.post()
    except (ValueError, LookupError, RuntimeError, web.RequestPayloadError):
        # Not UTF-8, an unknown charset or transfer encoding, a broken multipart body: aiohttp
        # raises each its own way, and none is a form a person's browser sent.
        return render(request, "login.html", 400, next="/ui/", error="That form could not be read.")
    presented = str(form.get("key", "")).strip()
    target = _next(str(form.get("next", "")))
    key = auth.find_key(keys, presented) if presented else None
    if key is None:
        return render(
            request, "login.html", 401, next=target, error="That key is not one of this gateway's."
        )
    if not auth.can_read(key):
        return render(
            request,
            "login.html",
            403,
            next=target,
            error="That key lacks the `read` scope (a proxy-only key cannot open the dashboard).",
        )
    response = _see_other(target)
    response.set_cookie(
        auth.UI_COOKIE,
        presented,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_over_https(request),
    )
    return response


@PAGES.post("/ui/logout")
async def logout(request: web.Request) -> web.Response:
    if _from_another_site(request):
        return _refused(request)
    response = _see_other("/ui/login" if request.app[GATEWAY].settings.auth.keys else "/ui/")
    response.del_cookie(auth.UI_COOKIE, path="/", samesite="Strict")
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def _refused(request: web.Request) -> web.Response:
    message = "Sign in and out from this gateway's own pages, not from another site."
    return render(request, "error.html", 403, status=403, message=message)


@PAGES.get("/ui")
async def to_overview(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def add_ui_routes(app: web.Application) -> None:
    """Register every `/ui` page and the vendored static files."""
    app.router.add_routes(PAGES)
    # The files are known at start: a name is looked up, never joined to a path.
    files = {
        path.relative_to(views.STATIC).as_posix(): path
        for path in views.STATIC.rglob("*")
        if path.is_file()
    }

    async def static_file(request: web.Request) -> web.FileResponse:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        # A script is only ever run as a script, whatever a proxy or browser would guess.
        return web.FileResponse(found, headers={"X-Content-Type-Options": "nosniff"})

    app.router.add_get("/ui/static/{name:.+}", static_file, name="ui-static")
