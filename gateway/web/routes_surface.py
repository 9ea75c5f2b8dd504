"""The rest of the OpenAI surface an SDK reaches: one model by id, stored responses by id (sent
to the deployment that made them), and a clear 404 for every `/v1` route spangate lacks."""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from gateway.errors import GatewayError, ModelNotFound, NotFoundError, UpstreamTimeout
from gateway.providers.base import RESPONSE_OPERATIONS, UpstreamRequest
from gateway.proxy.record import SpanRecord
from gateway.proxy.resilience import Guard
from gateway.web.auth import forwarded_client_headers
from gateway.web.bodies import read_body
from gateway.web.state import GATEWAY
from store.queries import response_origin

# Responses made lately, by id: found before the store has written their spans.
RECENT_RESPONSES = 10_000
_V1_PATH = re.compile(r"^(?:/rollout/[^/]+(?:/attempt/[^/]+)?)?/v1/")


class RecentResponses:
    """`response id -> (model group, deployment)` of the latest Responses calls, bounded."""

    def __init__(self, size: int = RECENT_RESPONSES) -> None:
        self.size = size
        self.origins: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def on_span(self, span: SpanRecord) -> None:
        response_id, deployment = span.get("response_id"), span.get("deployment")
        if span.get("operation") != "responses" or not response_id or not deployment:
            return
        self.origins[response_id] = (span.get("model_group") or "", deployment)
        if len(self.origins) > self.size:
            self.origins.popitem(last=False)


RECENT = web.AppKey("recent_responses", RecentResponses)


def _json(data: object) -> web.Response:
    return web.json_response(data, dumps=lambda o: orjson.dumps(o).decode())


async def retrieve_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    name = request.match_info["model"]
    if name not in gw.router.groups:
        raise ModelNotFound(f"The model `{name}` does not exist on this gateway", param="model")
    return _json({"id": name, "object": "model", "created": 0, "owned_by": "spangate"})


async def _origin(request: web.Request, response_id: str) -> Guard:
    """The deployment that made the response: by the gateway's memory, else by its span."""
    gw = request.app[GATEWAY]
    origin = request.app[RECENT].origins.get(response_id)
    if origin is None:
        stored = await gw.reader.run(response_origin, response_id)
        if stored is not None:
            origin = (stored["model_group"] or "", stored["deployment"])
    if origin is None:
        raise NotFoundError(
            f"Response with id '{response_id}' not found: no call through this gateway made it",
            param="response_id",
            code="response_not_found",
        )
    group, label = origin
    for guard in gw.router.guards.get(group, ()):
        if guard.deployment.label == label:
            return guard
    raise NotFoundError(
        f"Response with id '{response_id}' was made by deployment {label!r}, which no longer "
        f"serves {group!r}",
        param="response_id",
        code="response_not_found",
    )


async def _on_response(request: web.Request, operation: str) -> web.Response:
    gw = request.app[GATEWAY]
    response_id = request.match_info["response_id"]
    body = await read_body(request, gw.settings.server.body_timeout)
    guard = await _origin(request, response_id)
    deployment = guard.deployment
    client_headers = forwarded_client_headers(
        request.headers, [key.key for key in gw.settings.auth.keys]
    )
    upstream = UpstreamRequest(
        operation,
        body,
        {},
        False,
        deployment,
        client_headers,
        response_id=response_id,
        query=request.query,
    )
    try:
        async with asyncio.timeout(deployment.timeout.total):
            answer = await gw.providers[deployment.provider](upstream)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {deployment.label} did not answer in time") from exc
    redactor = gw.redactor.adding(_bearer(client_headers.get("authorization")))
    return web.Response(
        status=answer.status, body=redactor.value(answer.body or b""), headers=answer.headers
    )


def _bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else authorization


def _response_handler(operation: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return await _on_response(request, operation)

    handler.__name__ = operation
    return handler


def unsupported_route(method: str, path: str) -> GatewayError | None:
    """The 404 for a `/v1` route spangate does not serve (under a rollout prefix too)."""
    if _V1_PATH.match(path) is None:
        return None
    error = NotFoundError(f"spangate does not support {method} {path}", code="unsupported_route")
    error.type = "invalid_request_error"
    return error


async def _remember_responses(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: every published span passes by the memory of responses."""
    unsubscribe = app[GATEWAY].recorder.subscribe(app[RECENT].on_span)
    yield
    unsubscribe()


def add_surface_routes(app: web.Application, prefix: str) -> None:
    """Called once per rollout prefix; the memory of responses is set up with the first."""
    if RECENT not in app:
        app[RECENT] = RecentResponses()
        app.cleanup_ctx.append(_remember_responses)
    app.router.add_get(f"{prefix}/v1/models/{{model:.+}}", retrieve_model)
    for operation, (method, suffix) in RESPONSE_OPERATIONS.items():
        path = f"{prefix}/v1/responses/{{response_id}}{suffix}"
        if method == "GET":
            app.router.add_get(path, _response_handler(operation))  # HEAD too, as add_get does
        else:
            app.router.add_route(method, path, _response_handler(operation))
