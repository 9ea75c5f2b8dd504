"""The one place errors become responses: every failure answers in OpenAI's error shape."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.errors import GatewayError
from gateway.web.responses import Plain, error_plain, error_response, from_store_error, web_response
from gateway.web.routes_surface import unsupported_route
from gateway.web.state import GATEWAY
from store.errors import StoreError

log = logging.getLogger("spangate.http")

# aiohttp's own HTTP errors (unknown route, wrong method, body too large) -> OpenAI types.
_HTTP_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def _from_http(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        unsupported = unsupported_route(request.method, request.path)
        if unsupported is not None:
            return unsupported
    kind, code = _HTTP_TYPES.get(exc.status, ("invalid_request_error", None))
    if exc.status == 404:
        message = f"no route for {request.method} {request.path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    elif exc.status == 413:
        message = f"request body too large: {exc.text or ''}".strip()
    else:
        message = exc.text or exc.reason
    error = GatewayError(message, code=code)
    error.status = exc.status
    error.type = kind
    return error


def failure_answer(exc: Exception, method: str, path: str) -> Plain:
    """A failure that is no HTTP exception, in OpenAI's shape (called while `exc` is being
    handled); either HTTP server answers with it."""
    if isinstance(exc, GatewayError):
        return error_plain(exc)
    if isinstance(exc, StoreError):
        return error_plain(from_store_error(exc))
    log.exception("unhandled error on %s %s", method, path)
    return error_plain(GatewayError("internal gateway error; see the gateway log"))


def _error_answer(exc: Exception, request: web.Request) -> web.StreamResponse:
    """The failure in OpenAI's shape (called while `exc` is being handled)."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        error = _from_http(exc, request)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(error, headers=allow)
    return web_response(failure_answer(exc, request.method, request.path))


@web.middleware
async def error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Render every failure in OpenAI's shape, and count requests being handled (so a
    graceful stop knows when they are all done); one middleware, as each costs a layer."""
    gw = request.app[GATEWAY]
    gw.request_began()
    try:
        return await handler(request)
    except Exception as exc:
        if request.writer.output_size:
            # An answer is under way (a stream): a second one written into it would read as
            # garbage; aiohttp closes the connection instead.
            log.exception("failed after its answer began: %s %s", request.method, request.path)
            raise
        return _error_answer(exc, request)
    finally:
        gw.request_ended()
