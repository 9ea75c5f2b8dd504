"""Every error the gateway answers with, each tied to its HTTP status and OpenAI type/code.

- GatewayError (500 api_error)
  - InvalidRequest (400 invalid_request_error)
    - RolloutRequired (400, code rollout_required)
    - BodyTooLarge (413, code request_too_large)
    - RequestTimeout (408, code request_timeout)
  - AuthenticationFailed (401 authentication_error)
  - NotFoundError (404 not_found_error)
    - ModelNotFound (404 invalid_request_error, code model_not_found)
  - ConflictError (409 conflict_error)
  - ValidationFailed (422 invalid_request_error)
  - UpstreamError (502 upstream_error)
    - UpstreamUnreachable (502, code upstream_unreachable)
    - UpstreamTimeout (504, code upstream_timeout)
    - UpstreamProtocolError (502, code upstream_bad_response)
    - UpstreamTooLarge (502, code upstream_too_large)
  - TooManySubscribers (503 service_unavailable, code too_many_subscribers)
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from store.errors import Conflict, InvalidTransition, NotFound, StoreError


class GatewayError(Exception):
    """Base for every error answered in OpenAI's error shape."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError):
    """The request cannot be understood (bad JSON, missing or wrong fields)."""

    status = 400
    type = "invalid_request_error"


class RolloutRequired(InvalidRequest):
    """`require_rollout` is on and the call named no rollout."""

    code = "rollout_required"


class BodyTooLarge(InvalidRequest):
    """The request body is larger than `server.max_body_bytes`."""

    status = 413
    code = "request_too_large"


class RequestTimeout(InvalidRequest):
    """The client did not send its whole body within `server.body_timeout`."""

    status = 408
    code = "request_timeout"


class AuthenticationFailed(GatewayError):
    """No valid key was given."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(GatewayError):
    """The route or the named object does not exist."""

    status = 404
    type = "not_found_error"


class ModelNotFound(NotFoundError):
    """The requested model is not a configured model group."""

    type = "invalid_request_error"
    code = "model_not_found"


class ConflictError(GatewayError):
    """The request clashes with stored state (a terminal rollout, a reused id)."""

    status = 409
    type = "conflict_error"
    code = "conflict"


class ValidationFailed(GatewayError):
    """The body is well-formed JSON but a field is invalid."""

    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class UpstreamError(GatewayError):
    """The upstream provider could not give a usable answer."""

    status = 502
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    """Connecting to or talking with the upstream failed."""

    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not the API it claims to speak."""

    code = "upstream_bad_response"


class UpstreamTooLarge(UpstreamError):
    """The upstream's answer is over `limits.max_upstream_body_bytes` or a stream limit."""

    code = "upstream_too_large"


class TooManySubscribers(GatewayError):
    """`server.max_sse_subscribers` live event streams are open already."""

    status = 503
    type = "service_unavailable"
    code = "too_many_subscribers"


# Store errors know nothing of HTTP; this table gives each its answer.
STORE_ERRORS: dict[type[StoreError], type[GatewayError]] = {
    NotFound: NotFoundError,
    InvalidTransition: ConflictError,
    Conflict: ConflictError,
}


def from_store_error(exc: StoreError) -> GatewayError:
    for store_type, gateway_type in STORE_ERRORS.items():
        if isinstance(exc, store_type):
            return gateway_type(str(exc))
    return GatewayError(str(exc))


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: GatewayError, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=exc.status,
        body=orjson.dumps(exc.body()),
        content_type="application/json",
        headers=headers,
    )
