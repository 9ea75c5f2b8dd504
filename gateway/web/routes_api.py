"""The `/api` routes: rollouts, attempts, spans (with a live event stream), rewards and stats.

Reads run on the store's read threads; writes go through the writer thread, after every
span queued before them, so a reward posted right after a call finds that call.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from gateway.errors import (
    BodyTooLarge,
    InvalidRequest,
    ServiceUnavailable,
    TooManySubscribers,
    ValidationFailed,
)
from gateway.proxy import payload
from gateway.proxy.training import stored_mode
from gateway.web import api_models as m
from gateway.web.bodies import read_body
from gateway.web.limits import write_within
from gateway.web.responses import error_response
from gateway.web.state import GATEWAY, Gateway
from store import export, writes
from store import queries as listing
from store.errors import NotFound
from store.queries import BadCursor, get_rollout
from store.times import MAX_NS

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
MAX_API_BODY = 1024 * 1024
SSE_KEEPALIVE_SECONDS = 15.0
SSE_RETRY_AFTER_SECONDS = 5
SSE_BATCH = 200
# How often a write naming a call another replica may still hold looks for it again.
PEER_WAIT_SECONDS = 0.2


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _validation_error(exc: ValidationError) -> ValidationFailed:
    first = exc.errors()[0]
    where = _field_path(first["loc"])
    problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
    return ValidationFailed(problems, param=where)


async def json_object(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request, request.app[GATEWAY].settings.server.body_timeout)
    if len(raw) > MAX_API_BODY:
        raise BodyTooLarge(f"request body over {MAX_API_BODY} bytes")
    data = payload.loads(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


def validate(model: type[B], data: dict[str, Any]) -> B:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


async def body_of(request: web.Request, model: type[B]) -> B:
    return validate(model, await json_object(request))


def query_of(request: web.Request, model: type[B]) -> B:
    return validate(model, dict(request.query))


def time_param(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    from store.times import parse_since

    try:
        return parse_since(value)
    except ValueError as exc:
        raise ValidationFailed(f"{name}: {exc}", param=name) from exc


def listing_args(q: BaseModel, *, leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A listing's query as the store's keyword arguments, `since`/`until` as nanoseconds."""
    args = q.model_dump(exclude=set(leave_out))
    for name in ("since", "until"):
        if name in args:
            args[f"{name}_ns"] = time_param(args.pop(name), name)
    return args


async def page_of(
    request: web.Request, query: type[BaseModel], fn: Callable[..., Any]
) -> web.Response:
    """A listing route: its query validated, one page read; row ids stay inside the gateway."""
    page = await read(request.app[GATEWAY], fn, **listing_args(query_of(request, query)))
    for row in page.data:
        row.pop("_rowid", None)
    return json(page.as_dict())


async def read(gw: Gateway, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await gw.reader.run(lambda db: fn(db, *args, **kwargs))
    except BadCursor as exc:
        raise ValidationFailed(str(exc), param="cursor") from exc


async def write(gw: Gateway, fn: Callable[[Any], T]) -> T:
    """`fn(db)` on the writer thread, or ServiceUnavailable (503) once `recorder.api_write_timeout`
    passes: a locked store must not hold a client, nor its connection, indefinitely."""
    timeout = gw.settings.recorder.api_write_timeout
    try:
        return await asyncio.wait_for(gw.writer.execute(fn), timeout)
    except TimeoutError as exc:
        raise _busy(f"the store did not take this write within {timeout:g}s", timeout) from exc
    except sqlite3.OperationalError as exc:
        # SQLite gave up waiting for another connection's lock before our own bound did.
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise _busy("the store is locked by another connection", timeout) from exc


async def write_after_peers(gw: Gateway, fn: Callable[[Any], T]) -> T:
    """`write`; on a store replicas share, tried again for a moment while what it names is not
    found: behind a load balancer the call that made it (a rollout, an attempt, a span) may
    still be in the queue of the replica that served it, which stores it within
    `recorder.max_unsaved_seconds`."""
    if gw.writer.dialect != "postgresql":
        return await write(gw, fn)
    recorder = gw.settings.recorder
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(NotFound),
        stop=stop_after_delay(recorder.max_unsaved_seconds + recorder.flush_interval),
        wait=wait_fixed(PEER_WAIT_SECONDS),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await write(gw, fn)
    raise AssertionError("tenacity ended without an outcome")  # pragma: no cover


def _busy(reason: str, retry_after: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"{reason}; try again later (it may still be applied: "
        "a write that names its id is safe to repeat)",
        retry_after=retry_after,
    )


# -- rollouts -------------------------------------------------------------


async def create_rollout(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.RolloutCreate)
    row, created = await write(
        gw,
        lambda db: writes.create_rollout(
            db,
            rollout_id=body.id,
            input=body.input,
            agent=body.agent,
            metadata={**body.metadata, "mode": body.mode} if body.mode else body.metadata,
            tags=body.tags,
            budget=body.budget.stored() if body.budget else None,
        ),
    )
    # Calls of the rollout get the model group's parameters for the mode it is stored with
    # (an existing rollout keeps its own); "none" is worth knowing too, to not look it up.
    gw.modes.set(row["id"], stored_mode(row["metadata"]))
    # The agent counts too: its limits apply to the rollout's calls.
    if (body.budget is not None or body.agent is not None) and gw.budgets is not None:
        await gw.budgets.set_budget(row["id"], row["budget"], row["agent"])
    return json(row, status=201 if created else 200)


async def list_rollouts(request: web.Request) -> web.Response:
    return await page_of(request, m.RolloutQuery, listing.list_rollouts)


async def get_rollout_view(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    rollout = await read(gw, get_rollout, request.match_info["rollout_id"])
    if gw.budgets is not None:
        rollout["budget_usage"] = await gw.budgets.view(rollout["id"])
    for attempt in rollout["attempts"]:
        for span in attempt["spans"]:
            span.pop("request_body", None)
            span.pop("response_body", None)
    for span in rollout["unattempted_spans"]:
        span.pop("request_body", None)
        span.pop("response_body", None)
    return json(rollout)


async def update_rollout(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.RolloutUpdate)
    rollout_id = request.match_info["rollout_id"]
    row = await write_after_peers(
        gw,
        lambda db: writes.update_rollout(
            db,
            rollout_id,
            status=body.status,
            metadata=body.metadata,
            tags=body.tags,
            budget=body.budget.stored() if body.budget else None,
        ),
    )
    if body.budget is not None and gw.budgets is not None:
        await gw.budgets.set_budget(rollout_id, row["budget"], row["agent"])
    gw.recorder.publish_rollout(row)
    return json(row)


async def create_attempt(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.AttemptCreate)
    rollout_id = request.match_info["rollout_id"]

    def opened(db: Any) -> dict[str, Any]:
        row = writes.create_attempt(db, rollout_id, attempt_id=body.id)
        writes.announce_attempt(db, gw.sequencer.origin, row)
        return row

    row = await write_after_peers(gw, opened)
    # Later calls to /rollout/{id}/v1 (no attempt named) join the new attempt, here and, told
    # at commit, on every replica sharing the store.
    gw.sequencer.set_attempt(rollout_id, row["id"], row["number"])
    return json(row, status=201)


async def update_attempt(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.AttemptUpdate)
    rollout_id, attempt_id = request.match_info["rollout_id"], request.match_info["attempt_id"]
    row = await write_after_peers(
        gw, lambda db: writes.update_attempt(db, rollout_id, attempt_id, status=body.status)
    )
    return json(row)


async def export_rollout_view(request: web.Request) -> web.Response:
    """One rollout for training: `jsonl` (the whole tree) or `triplets` (a line per call)."""
    gw = request.app[GATEWAY]
    q = query_of(request, m.ExportQuery)
    rollout_id = request.match_info["rollout_id"]
    if q.format == "triplets":

        def triplets(db: Any) -> list[dict[str, Any]]:
            export.export_rollout(db, rollout_id)  # 404 for an unknown rollout
            return list(
                export.iter_triplets(
                    db,
                    rollout_ids=[rollout_id],
                    reward_name=q.reward_name,
                    reward_rule=q.reward_rule,
                    gamma=q.gamma,
                )
            )

        lines = await read(gw, triplets)
    else:
        lines = [await read(gw, export.export_rollout, rollout_id)]
    return web.Response(
        body=b"".join(orjson.dumps(line) + b"\n" for line in lines),
        content_type="application/x-ndjson",
    )


# -- spans ----------------------------------------------------------------


# Where a span query starts and how much it takes; the rest of its fields filter the spans.
PAGING = frozenset({"cursor", "limit", "after"})


async def list_spans(request: web.Request) -> web.Response:
    return await page_of(request, m.SpanQuery, listing.list_spans)


async def get_span(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    span = await read(gw, listing.get_span, request.match_info["span_id"])
    span.pop("_rowid", None)
    return json(span)


async def stream_spans(request: web.Request) -> web.StreamResponse:
    """Server-sent events, one `span` event per written span; resumable with Last-Event-ID."""
    gw = request.app[GATEWAY]
    feed = request.app[FEED]
    q = query_of(request, m.SpanStreamQuery)
    filters = listing_args(q, leave_out=PAGING)
    after = _event_id(request.headers.get("Last-Event-ID"))
    if after is None:
        after = q.after
    if feed.subscribers >= feed.limit:
        return error_response(
            TooManySubscribers(
                f"{feed.limit} live event streams are open (server.max_sse_subscribers); "
                "try again later"
            ),
            headers={"Retry-After": str(SSE_RETRY_AFTER_SECONDS)},
        )
    feed.subscribers += 1
    try:
        return await _stream(request, gw, feed, filters, after)
    finally:
        feed.subscribers -= 1


async def _stream(
    request: web.Request, gw: Gateway, feed: SpanFeed, filters: dict[str, Any], after: int | None
) -> web.StreamResponse:
    write_timeout = gw.settings.server.write_timeout
    if after is None:
        # A new subscriber starts at the live edge, not at the beginning of history.
        after = await gw.reader.run(lambda db: listing.max_rowid(db))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    if request.method == "HEAD":
        # The headers say what a GET would stream; a HEAD never gets, nor waits for, events.
        return response
    try:
        await write_within(request, response, b": connected\n\n", write_timeout)
        while not feed.closing:
            # Taken before the read, so a commit that lands during it still wakes us.
            changed = feed.changed
            page = await read(gw, listing.list_spans, after_rowid=after, limit=SSE_BATCH, **filters)
            for row in page.data:
                after = row.pop("_rowid")
                event = f"id: {after}\nevent: span\ndata: {dumps(row)}\n\n".encode()
                await write_within(request, response, event, write_timeout)
            if page.next_cursor:
                continue
            try:
                # No polling: an idle subscriber costs one timer until a commit or a keepalive.
                async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                    await changed.wait()
            except TimeoutError:
                await write_within(request, response, b": keepalive\n\n", write_timeout)
    except ConnectionError:
        pass  # the subscriber went away or stopped reading; nothing of theirs to clean up
    return response


def _event_id(value: str | None) -> int | None:
    """A `Last-Event-ID` header as an event id (a row id): digits, below SQLite's limit."""
    if not value:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and int(value) < MAX_NS):
        raise ValidationFailed(
            "Last-Event-ID must be an event id: the `id` of an event this stream sent",
            param="Last-Event-ID",
        )
    return int(value)


class SpanFeed:
    """One wake-up shared by every live event stream.

    The writer's commit hook fires once per commit and swaps in a fresh event, waking every
    subscriber at once; none of them polls the database while nothing is written.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.subscribers = 0
        self.closing = False
        self.changed = asyncio.Event()

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self.closing = True
        self.notify()


# -- rewards --------------------------------------------------------------


async def create_reward(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    data = await json_object(request)
    rollout_id = request.match_info.get("rollout_id")
    if rollout_id:
        if data.get("rollout_id") not in (None, rollout_id):
            raise ValidationFailed(
                "rollout_id in the body differs from the path", param="rollout_id"
            )
        data["rollout_id"] = rollout_id
    body = validate(m.RewardCreate, data)
    row, created = await write_after_peers(gw, lambda db: writes.add_reward(db, body.model_dump()))
    if created:
        gw.recorder.publish_reward(row)
    return json(row, status=201 if created else 200)


async def list_rewards(request: web.Request) -> web.Response:
    return await page_of(request, m.RewardQuery, listing.list_rewards)


async def get_stats(request: web.Request) -> web.Response:
    args = listing_args(query_of(request, m.StatsQuery))
    return json(await read(request.app[GATEWAY], listing.stats, **args))


# -- route table ----------------------------------------------------------


@dataclass(frozen=True)
class ApiRoute:
    """One route, with what /openapi.json says about it."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    scope: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("POST", "/api/rollouts", create_rollout, "Create a rollout (or return the existing one)", "write", m.RolloutCreate, None, m.Rollout, 201, (409, 422)),
    ApiRoute("GET", "/api/rollouts", list_rollouts, "List rollouts, newest first", "read", None, m.RolloutQuery, m.RolloutPage, 200, (422,)),
    ApiRoute("GET", "/api/rollouts/{rollout_id}", get_rollout_view, "A rollout with attempts, calls, rewards, a summary and its budget", "read", None, None, m.RolloutDetail, 200, (404,)),
    ApiRoute("PATCH", "/api/rollouts/{rollout_id}", update_rollout, "Change a rollout's status, metadata, tags or budget", "write", m.RolloutUpdate, None, m.Rollout, 200, (404, 409, 422)),
    ApiRoute("POST", "/api/rollouts/{rollout_id}/attempts", create_attempt, "Open a new attempt", "write", m.AttemptCreate, None, m.Attempt, 201, (404, 409, 422)),
    ApiRoute("PATCH", "/api/rollouts/{rollout_id}/attempts/{attempt_id}", update_attempt, "Change an attempt's status", "write", m.AttemptUpdate, None, m.Attempt, 200, (404, 409, 422)),
    ApiRoute("POST", "/api/rollouts/{rollout_id}/rewards", create_reward, "Reward a rollout (or one of its attempts or calls)", "write", m.RewardCreate, None, m.Reward, 201, (404, 409, 422)),
    ApiRoute("GET", "/api/rollouts/{rollout_id}/export", export_rollout_view, "A rollout for training, as JSON lines (jsonl or triplets)", "read", None, m.ExportQuery, None, 200, (404, 422)),
    ApiRoute("GET", "/api/spans", list_spans, "List recorded calls in write order", "read", None, m.SpanQuery, m.SpanPage, 200, (422,)),
    ApiRoute("GET", "/api/spans/stream", stream_spans, "Live calls as server-sent events", "read", None, m.SpanStreamQuery, None, 200, (422,)),
    ApiRoute("GET", "/api/spans/{span_id}", get_span, "One call with its request and response bodies", "read", None, None, m.Span, 200, (404,)),
    ApiRoute("POST", "/api/rewards", create_reward, "Record a reward for a rollout, attempt or call", "write", m.RewardCreate, None, m.Reward, 201, (404, 409, 422)),
    ApiRoute("GET", "/api/rewards", list_rewards, "List rewards", "read", None, m.RewardQuery, m.RewardPage, 200, (422,)),
    ApiRoute("GET", "/api/stats", get_stats, "Calls, errors, tokens and cost by model", "read", None, m.StatsQuery, m.Stats, 200, (422,)),
)  # fmt: skip


FEED = web.AppKey("span_feed", SpanFeed)


def close_streams(app: web.Application) -> None:
    """End every live event stream (at shutdown: they would otherwise hold it up)."""
    if FEED in app:
        app[FEED].close()


async def _close_streams(app: web.Application) -> None:
    close_streams(app)


async def _span_feed(app: web.Application) -> AsyncIterator[None]:
    """Wake the event streams from the writer thread, once per commit."""
    feed = app[FEED]
    writer = app[GATEWAY].writer
    loop = asyncio.get_running_loop()
    seen = writer.written + writer.replayed

    def committed() -> None:
        # The writer calls this after every flush interval, rows or not: subscribers are
        # woken only when spans were written, or each idle one would query five times a second.
        nonlocal seen
        now = writer.written + writer.replayed
        if now != seen and not loop.is_closed():
            seen = now
            loop.call_soon_threadsafe(feed.notify)

    unsubscribe = writer.on_commit(committed)
    yield
    unsubscribe()


# Every ApiRoute the app serves, in order; `/openapi.json` is built from this.
REGISTERED = web.AppKey("api_routes", list[ApiRoute])


def add_routes(app: web.Application, routes: tuple[ApiRoute, ...]) -> None:
    if REGISTERED not in app:
        app[REGISTERED] = []
    app[REGISTERED].extend(routes)
    if FEED not in app:
        app[FEED] = SpanFeed(app[GATEWAY].settings.server.max_sse_subscribers)
        app.on_shutdown.append(_close_streams)
        app.cleanup_ctx.append(_span_feed)
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)
        if route.method == "GET":
            # As `add_get` does: HEAD answers like GET, without the body.
            app.router.add_route("HEAD", route.path, route.handler)
