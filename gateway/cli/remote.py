"""HTTP helpers for CLI commands that talk to a running gateway: `tail --url` and `reward --url`.

The gateway's API is the only contract: spans are listed with `GET /api/spans` and followed
over `GET /api/spans/stream` (server-sent events, resumed with `Last-Event-ID`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
import httpx
import orjson

from gateway.cli.render import TailView, printable

# The API pages at most this many spans per request.
PAGE_LIMIT = 1000
# `GET /api/spans` lists oldest first and has no "newest first": to find the last N calls,
# page through a recent window (relative to the gateway's clock) and widen it to the whole
# history only if the window holds fewer than N. One hour is far longer than any call can
# last (upstream timeouts), so no call written among the last N started before the window.
BACKLOG_WINDOWS: tuple[str | None, ...] = ("1h", None)
# --follow replays the stream from this long before the newest call already printed, so a
# call in flight while the backlog was read (started earlier, written later) is not missed;
# everything up to the last printed call is skipped, so nothing is printed twice.
IN_FLIGHT_MARGIN_NS = 3600 * 1_000_000_000
CONNECT_TIMEOUT = 10.0
# The stream sends a keepalive comment after 15 s of silence; three missed means it is dead.
STREAM_READ_TIMEOUT = 45.0
REQUEST_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
# Statuses worth reconnecting after; others (401, 403, 404, 422...) will not get better.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteError(click.ClickException):
    """The gateway answered with an error, or could not be reached."""


def normalize_url(url: str) -> str:
    """The gateway's base URL: scheme added if missing, no trailing slash, no `/v1` or `/api`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    for suffix in ("/v1", "/api"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def make_client(
    url: str, key: str | None, *, read_timeout: float = REQUEST_TIMEOUT
) -> httpx.Client:
    base = normalize_url(url)
    try:
        parsed = httpx.URL(base)
    except httpx.InvalidURL as exc:
        raise RemoteError(f"--url {printable(url)} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise RemoteError(f"--url {printable(url)} is not an http(s) URL")
    # Sent as a header: only printable ASCII can be. The key itself is never echoed.
    if key and not (key.isascii() and key.isprintable()):
        raise RemoteError("--key (or $SPANGATE_KEY) must be printable ASCII, as API keys are")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=read_timeout)
    return httpx.Client(base_url=base, headers=headers, timeout=timeout)


def _json_of(client: httpx.Client, response: httpx.Response) -> Any:
    """The body as JSON; anything else means something other than spangate answered."""
    try:
        return response.json()
    except ValueError:
        raise RemoteError(
            f"{client.base_url} did not answer as a spangate gateway "
            f"({response.request.url.path}: {response.status_code}, "
            f"{printable(response.headers.get('content-type', 'no content type'))})"
        ) from None


def error_message(response: httpx.Response) -> str:
    """The message of an API error (`{"error": {"message": ...}}`), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or "")
    else:
        message = response.text[:300]
    # Whatever answers at that address writes this to our terminal.
    text = f"{response.status_code} {response.reason_phrase}: {message}".rstrip(": ")
    return printable(text)


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        raise RemoteError(f"{response.request.url.path}: {error_message(response)}")


def _unreachable(client: httpx.Client, exc: httpx.HTTPError) -> RemoteError:
    return RemoteError(f"cannot reach the gateway at {client.base_url}: {exc}")


def get_json(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> Any:
    try:
        response = client.get(
            path, params={k: v for k, v in (params or {}).items() if v is not None}
        )
    except httpx.HTTPError as exc:
        raise _unreachable(client, exc) from exc
    _check(response)
    return _json_of(client, response)


# -- rewards ------------------------------------------------------------------


def post_reward(url: str, key: str | None, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """`POST /api/rewards`; `(stored reward, created)` (an idempotent repeat is not created)."""
    with make_client(url, key) as client:
        try:
            response = client.post("/api/rewards", json=body)
        except httpx.HTTPError as exc:
            raise _unreachable(client, exc) from exc
        if response.status_code >= 400:
            raise RemoteError(error_message(response))
        return _json_of(client, response), response.status_code == 201


# -- spans --------------------------------------------------------------------


def latest_spans(
    client: httpx.Client, *, rollout_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """The last `limit` spans in write order (without bodies), paging through `GET /api/spans`."""
    if limit <= 0:
        return []
    kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)
    for window in BACKLOG_WINDOWS:
        kept.clear()
        seen = 0
        cursor: str | None = None
        while True:
            page = get_json(
                client,
                "/api/spans",
                {"rollout_id": rollout_id, "since": window, "limit": PAGE_LIMIT, "cursor": cursor},
            )
            kept.extend(page["data"])
            seen += len(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        if seen >= limit or window is None or not _any_before(client, rollout_id, window):
            break
    return list(kept)


def _any_before(client: httpx.Client, rollout_id: str | None, moment: str) -> bool:
    page = get_json(client, "/api/spans", {"rollout_id": rollout_id, "until": moment, "limit": 1})
    return bool(page["data"])


def with_bodies(client: httpx.Client, span: dict[str, Any]) -> dict[str, Any]:
    """The span with its request and response bodies (`GET /api/spans/{id}`); as given on error."""
    try:
        response = client.get(f"/api/spans/{span['span_id']}")
    except httpx.HTTPError:
        return span
    if response.status_code != 200:
        return span
    try:
        full: dict[str, Any] = response.json()
    except ValueError:
        return span
    # In the stored column order, as the local `tail --bodies` prints it.
    return {**full, **{key: value for key, value in span.items() if key not in full}}


@dataclass
class Event:
    """One server-sent event."""

    id: str | None = None
    event: str = "message"
    data: list[str] = field(default_factory=list)


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """SSE framing: `field: value` lines, a blank line ends an event, `:` lines are comments."""
    current = Event()
    dirty = False
    for line in lines:
        if line == "":
            if dirty:
                yield current
            current, dirty = Event(), False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            current.id = value
        elif name == "event":
            current.event = value
        elif name == "data":
            current.data.append(value)
        else:
            continue
        dirty = True


def iso(ns: int) -> str:
    """A gateway timestamp (ns since the epoch) as ISO 8601 UTC, which `since=` accepts."""
    return datetime.fromtimestamp(ns // 1000 / 1e6, UTC).isoformat()


@dataclass
class Follow:
    """Where a follower resumes: after the event `last_id`, or (first connection) after a span.

    With `skip_until` set, events are read but not yielded until that span's own event has
    passed: the stream replays from `since` so nothing written after the backlog is missed.
    """

    rollout_id: str | None = None
    since_ns: int | None = None
    skip_until: str | None = None
    last_id: str | None = None

    @classmethod
    def after(cls, backlog: list[dict[str, Any]], rollout_id: str | None) -> Follow:
        if not backlog:
            # No call matches yet: every one the stream shows from the beginning is new.
            return cls(rollout_id=rollout_id, last_id="0")
        newest_start = max(span["start_ns"] for span in backlog)
        last = backlog[-1]
        return cls(
            rollout_id=rollout_id,
            since_ns=min(last["start_ns"], newest_start - IN_FLIGHT_MARGIN_NS),
            skip_until=last["span_id"],
            last_id="0",
        )


def follow_spans(
    client: httpx.Client,
    position: Follow,
    *,
    notify: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """New spans from `GET /api/spans/stream`, forever; a dropped connection is resumed with
    `Last-Event-ID` after a bounded backoff, so nothing is missed or repeated.

    `notify` hears once when the stream is lost and once when it is back.
    """
    params = {"rollout_id": position.rollout_id}
    if position.since_ns is not None:
        params["since"] = iso(position.since_ns)
    delay = BACKOFF_INITIAL
    lost_at: float | None = None
    while True:
        headers = {"Accept": "text/event-stream"}
        if position.last_id is not None:
            headers["Last-Event-ID"] = position.last_id
        problem: str
        try:
            with client.stream(
                "GET",
                "/api/spans/stream",
                params={k: v for k, v in params.items() if v is not None},
                headers=headers,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code not in RETRY_STATUSES:
                        raise RemoteError(f"/api/spans/stream: {error_message(response)}")
                    problem = error_message(response)
                else:
                    delay = BACKOFF_INITIAL
                    if lost_at is not None:
                        if notify is not None:
                            notify(f"reconnected after {time.monotonic() - lost_at:.1f}s")
                        lost_at = None
                    yield from _spans_of(response, position)
                    problem = "the gateway closed the stream"
        except httpx.HTTPError as exc:
            problem = str(exc) or type(exc).__name__
        if lost_at is None:
            lost_at = time.monotonic()
            if notify is not None:
                notify(f"stream interrupted ({problem}); reconnecting")
        sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def _spans_of(response: httpx.Response, position: Follow) -> Iterator[dict[str, Any]]:
    """The spans of one connection's events, advancing `position` past each event read."""
    for event in parse_events(response.iter_lines()):
        if event.event != "span" or not event.data:
            continue
        try:
            span: dict[str, Any] = orjson.loads("\n".join(event.data))
        except orjson.JSONDecodeError as exc:
            raise RemoteError(f"/api/spans/stream sent a bad event: {exc}") from exc
        if event.id is not None:
            position.last_id = event.id
        if position.skip_until is not None:
            if span.get("span_id") == position.skip_until:
                position.skip_until = None
            continue
        yield span


# -- the tail command ---------------------------------------------------------


def tail_remote(url: str, key: str | None, view: TailView) -> None:
    """`spangate tail --url`: the last `view.limit` calls of a running gateway, then (with
    `view.follow`) every new one as it is recorded."""
    # Lines show the start of the reply, which only the full span has.
    hydrate = view.bodies or not view.as_json

    with make_client(url, key) as client:
        # With --follow, one call is read even for `-n 0`: it anchors where the stream resumes.
        wanted = max(view.limit, 1 if view.follow else 0)
        anchor = latest_spans(client, rollout_id=view.rollout_id, limit=wanted)
        backlog = anchor[-view.limit :] if view.limit else []
        if hydrate:
            backlog = [with_bodies(client, span) for span in backlog]
        view.backlog(backlog)
        if not view.follow:
            return

    def notify(message: str) -> None:
        click.echo(f"spangate: {printable(message)}", err=True)

    with make_client(url, key, read_timeout=STREAM_READ_TIMEOUT) as client:
        position = Follow.after(anchor, view.rollout_id)
        for span in follow_spans(client, position, notify=notify):
            view.emit(with_bodies(client, span) if hydrate else span)
