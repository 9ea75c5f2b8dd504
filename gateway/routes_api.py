"""The `/api` routes: rollouts, attempts, spans (with a live event stream), rewards and stats.

Reads run on the store's read threads; writes go through the writer thread, after every
span queued before them, so a reward posted right after a call finds that call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway import api_models as m
from gateway.errors import BodyTooLarge, InvalidRequest, ValidationFailed
from gateway.state import GATEWAY, Gateway
from store import export, listing, writes
from store.listing import BadCursor
from store.queries import get_rollout

B = TypeVar("B", bound=BaseModel)
MAX_API_BODY = 1024 * 1024
SSE_KEEPALIVE_SECONDS = 15.0
SSE_POLL_SECONDS = 1.0
SSE_BATCH = 200
MAX_NS = 2**63  # SQLite integers are signed 64-bit


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
    raw = await request.read()
    if len(raw) > MAX_API_BODY:
        raise BodyTooLarge(f"request body over {MAX_API_BODY} bytes")
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
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
    from store.export import parse_since

    try:
        moment = parse_since(value)
    except (ValueError, OverflowError) as exc:
        raise ValidationFailed(f"{name}: {exc}", param=name) from exc
    if not 0 <= moment < MAX_NS:
        raise ValidationFailed(f"{name}: {value!r} is outside the storable time range", param=name)
    return moment


async def read(gw: Gateway, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await gw.reader.run(lambda db: fn(db, *args, **kwargs))
    except BadCursor as exc:
        raise ValidationFailed(str(exc), param="cursor") from exc


# -- rollouts -------------------------------------------------------------


async def create_rollout(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.RolloutCreate)
    row, created = await gw.writer.execute(
        lambda db: writes.create_rollout(
            db,
            rollout_id=body.id,
            input=body.input,
            agent=body.agent,
            metadata=body.metadata,
            tags=body.tags,
        )
    )
    return json(row, status=201 if created else 200)


async def list_rollouts(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.RolloutQuery)
    page = await read(
        gw,
        listing.list_rollouts,
        status=q.status,
        agent=q.agent,
        tag=q.tag,
        since_ns=time_param(q.since, "since"),
        until_ns=time_param(q.until, "until"),
        cursor=q.cursor,
        limit=q.limit,
    )
    return json(page.as_dict())


async def get_rollout_view(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    rollout = await read(gw, get_rollout, request.match_info["rollout_id"])
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
    row = await gw.writer.execute(
        lambda db: writes.update_rollout(
            db, rollout_id, status=body.status, metadata=body.metadata, tags=body.tags
        )
    )
    gw.recorder.publish_rollout(row)
    return json(row)


async def create_attempt(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.AttemptCreate)
    rollout_id = request.match_info["rollout_id"]
    row = await gw.writer.execute(
        lambda db: writes.create_attempt(db, rollout_id, attempt_id=body.id)
    )
    # Later calls to /rollout/{id}/v1 (no attempt named) join the new attempt.
    gw.sequencer.set_attempt(rollout_id, row["id"])
    return json(row, status=201)


async def update_attempt(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await body_of(request, m.AttemptUpdate)
    rollout_id, attempt_id = request.match_info["rollout_id"], request.match_info["attempt_id"]
    row = await gw.writer.execute(
        lambda db: writes.update_attempt(db, rollout_id, attempt_id, status=body.status)
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
                export.iter_triplets(db, rollout_ids=[rollout_id], reward_name=q.reward_name)
            )

        lines = await read(gw, triplets)
    else:
        lines = [await read(gw, export.export_rollout, rollout_id)]
    return web.Response(
        body=b"".join(orjson.dumps(line) + b"\n" for line in lines),
        content_type="application/x-ndjson",
    )


# -- spans ----------------------------------------------------------------


def _span_filters(q: m.SpanQuery) -> dict[str, Any]:
    return {
        "rollout_id": q.rollout_id,
        "attempt_id": q.attempt_id,
        "model": q.model,
        "status": q.status,
        "tag": q.tag,
        "since_ns": time_param(q.since, "since"),
        "until_ns": time_param(q.until, "until"),
    }


async def list_spans(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.SpanQuery)
    page = await read(gw, listing.list_spans, cursor=q.cursor, limit=q.limit, **_span_filters(q))
    for row in page.data:
        row.pop("_rowid", None)
    return json(page.as_dict())


async def get_span(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    span = await read(gw, listing.get_span, request.match_info["span_id"])
    span.pop("_rowid", None)
    return json(span)


async def stream_spans(request: web.Request) -> web.StreamResponse:
    """Server-sent events, one `span` event per written span; resumable with Last-Event-ID."""
    gw = request.app[GATEWAY]
    q = query_of(request, m.SpanStreamQuery)
    filters = _span_filters(q)
    last = request.headers.get("Last-Event-ID") or (str(q.after) if q.after is not None else None)
    try:
        after = int(last) if last else None
    except ValueError as exc:
        raise ValidationFailed("Last-Event-ID must be an event id", param="Last-Event-ID") from exc
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
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    unsubscribe = gw.writer.on_commit(lambda: _wake_threadsafe(loop, wake))
    closing = request.app[CLOSING]
    streams = request.app[STREAMS]
    streams.add(wake)
    last_write = time.monotonic()
    try:
        await response.write(b": connected\n\n")
        while request.transport is not None and not request.transport.is_closing():
            page = await read(gw, listing.list_spans, after_rowid=after, limit=SSE_BATCH, **filters)
            for row in page.data:
                after = row.pop("_rowid")
                await response.write(f"id: {after}\nevent: span\ndata: {dumps(row)}\n\n".encode())
                last_write = time.monotonic()
            if page.next_cursor:
                continue
            if closing.is_set():
                break
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), SSE_POLL_SECONDS)
            except TimeoutError:
                if time.monotonic() - last_write > SSE_KEEPALIVE_SECONDS:
                    await response.write(b": keepalive\n\n")
                    last_write = time.monotonic()
    except ConnectionError:
        pass  # the subscriber went away; nothing of theirs to clean up but the hook below
    finally:
        streams.discard(wake)
        unsubscribe()
    return response


def _wake_threadsafe(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
    """Called on the writer thread after each commit."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(wake.set)


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
    row, created = await gw.writer.execute(lambda db: writes.add_reward(db, body.model_dump()))
    if created:
        gw.recorder.publish_reward(row)
    return json(row, status=201 if created else 200)


async def list_rewards(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.RewardQuery)
    page = await read(
        gw,
        listing.list_rewards,
        rollout_id=q.rollout_id,
        attempt_id=q.attempt_id,
        span_id=q.span_id,
        name=q.name,
        source=q.source,
        cursor=q.cursor,
        limit=q.limit,
    )
    for row in page.data:
        row.pop("_rowid", None)
    return json(page.as_dict())


async def get_stats(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    q = query_of(request, m.StatsQuery)
    return json(await read(gw, listing.stats, since_ns=time_param(q.since, "since")))


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
    ApiRoute("GET", "/api/rollouts/{rollout_id}", get_rollout_view, "A rollout with attempts, calls, rewards and a summary", "read", None, None, m.RolloutDetail, 200, (404,)),
    ApiRoute("PATCH", "/api/rollouts/{rollout_id}", update_rollout, "Change a rollout's status, metadata or tags", "write", m.RolloutUpdate, None, m.Rollout, 200, (404, 409, 422)),
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


# Set when the server shuts down, so long-lived event streams end instead of holding it up.
CLOSING = web.AppKey("closing", asyncio.Event)


def close_streams(app: web.Application) -> None:
    """End every live event stream (at shutdown: they would otherwise hold it up)."""
    if CLOSING in app:
        app[CLOSING].set()
        for stream_wake in list(app[STREAMS]):
            stream_wake.set()


async def _close_streams(app: web.Application) -> None:
    close_streams(app)


STREAMS = web.AppKey("streams", set)


def add_routes(app: web.Application, routes: tuple[ApiRoute, ...]) -> None:
    if CLOSING not in app:
        app[CLOSING] = asyncio.Event()
        app[STREAMS] = set()
        app.on_shutdown.append(_close_streams)
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)
