"""Reading a request's JSON body: its encoding and its nesting are checked before any route
uses it, so a lying `Content-Encoding` or a body nested hundreds of levels deep is a 400.

orjson parses up to 1024 levels but serializes only 254, and the gateway serializes what it
parsed again (a renamed model, injected stream options, the record, litellm's copy), so a
body it accepted could fail later with a 500. `MAX_JSON_DEPTH` leaves room for those
wrappers; no real request comes near it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest, RequestTimeout, UnreadableBody

MAX_JSON_DEPTH = 128


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The body, decoded as its `Content-Encoding` says: 400 when it is not so encoded, 408
    when the client takes longer than `timeout` to send it.

    aiohttp bounds the size (`client_max_size`) but not the time: without the deadline, a
    client sending a byte a second holds a handler (and graceful shutdown) for as long as it
    likes.
    """
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g}s (server.body_timeout)"
        ) from exc
    except web.RequestPayloadError as exc:
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(
            f"the request body could not be read as Content-Encoding {encoding!r}: "
            "send it encoded as declared, or without Content-Encoding"
        ) from exc


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than `limit` levels (the top one is level 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def loads(raw: bytes) -> Any:
    """Parse a request body; InvalidRequest for anything that is not JSON we can work with."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    # Nesting needs brackets: a body with few of them is shallow, without walking it.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(value):
        raise InvalidRequest(
            f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            code="json_too_deep",
        )
    return value
