"""Where errors become responses: every `GatewayError` (and every store error, through one
table) is answered here in OpenAI's error shape, with `Retry-After` when the error has one."""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from gateway.errors import (
    ConflictError,
    GatewayError,
    NotFoundError,
    ServiceUnavailable,
    ValidationFailed,
)
from store.errors import (
    Conflict,
    InvalidTransition,
    InvalidValue,
    NotFound,
    StoreBusy,
    StoreError,
)

# Store errors know nothing of HTTP; this table gives each its answer.
STORE_ERRORS: dict[type[StoreError], type[GatewayError]] = {
    NotFound: NotFoundError,
    InvalidValue: ValidationFailed,
    InvalidTransition: ConflictError,
    Conflict: ConflictError,
    StoreBusy: ServiceUnavailable,
}


def from_store_error(exc: StoreError) -> GatewayError:
    for store_type, gateway_type in STORE_ERRORS.items():
        if isinstance(exc, store_type):
            return gateway_type(str(exc))
    return GatewayError(str(exc))


def error_response(exc: GatewayError, *, headers: dict[str, str] | None = None) -> web.Response:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after)))}
    response = web.Response(
        status=exc.status,
        body=orjson.dumps(exc.body()),
        content_type="application/json",
        headers=headers,
    )
    if exc.close_connection:
        response.force_close()
    return response
