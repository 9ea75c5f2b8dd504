"""Where errors become responses: every `GatewayError` (and every store error, through one
table) is answered here in OpenAI's error shape, with `Retry-After` when the error has one."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(slots=True)
class Plain:
    """A whole answer, ready for either HTTP server: aiohttp's (`web_response`) or the front's."""

    status: int
    headers: dict[str, str]
    body: bytes
    close: bool = False


def web_response(plain: Plain) -> web.Response:
    response = web.Response(status=plain.status, body=plain.body, headers=plain.headers)
    if plain.close:
        response.force_close()
    return response


def error_plain(exc: GatewayError, *, headers: dict[str, str] | None = None) -> Plain:
    retry_after = getattr(exc, "retry_after", None)
    answer = {**headers} if headers else {}
    if retry_after is not None:
        answer["Retry-After"] = str(max(1, math.ceil(retry_after)))
    answer["Content-Type"] = "application/json"
    return Plain(exc.status, answer, orjson.dumps(exc.body()), exc.close_connection)


def error_response(exc: GatewayError, *, headers: dict[str, str] | None = None) -> web.Response:
    return web_response(error_plain(exc, headers=headers))
