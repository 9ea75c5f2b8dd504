"""API keys and scopes: which key may call which route, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import web

from config.models import ApiKey
from gateway.errors import AuthenticationFailed, GatewayError

OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/openapi.json"})
# Set on the request when the gateway key came in `Authorization`, so it is never forwarded.
KEY_IN_AUTHORIZATION = web.RequestKey("key_in_authorization", bool)


class PermissionDenied(GatewayError):
    """The key is valid but lacks the scope the route needs."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


def required_scope(method: str, path: str) -> str | None:
    if path in OPEN_PATHS:
        return None
    if path.startswith("/api/") or path == "/metrics":
        return "read" if method in ("GET", "HEAD", "OPTIONS") else "write"
    return "proxy"


def presented_key(headers: Mapping[str, str]) -> tuple[str | None, bool]:
    """The key the client sent and whether it came in `Authorization` (vs `X-Api-Key`)."""
    explicit = headers.get("X-Api-Key")
    if explicit:
        return explicit.strip(), False
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), True
    return None, False


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """Compare against every key, each in constant time, so timing reveals nothing."""
    found = None
    given = presented.encode()
    for key in keys:
        if hmac.compare_digest(key.key.encode(), given):
            found = key
    return found


def auth_middleware(keys: list[ApiKey]) -> web.Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        scope = required_scope(request.method, request.path)
        if scope is None:
            return await handler(request)
        presented, in_authorization = presented_key(request.headers)
        if presented is None:
            raise AuthenticationFailed(
                "missing API key: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`"
            )
        key = find_key(keys, presented)
        if key is None:
            raise AuthenticationFailed("invalid API key")
        if scope not in key.scopes and "admin" not in key.scopes:
            raise PermissionDenied(f"this key lacks the {scope!r} scope")
        request[KEY_IN_AUTHORIZATION] = in_authorization
        return await handler(request)

    return middleware


def forwarded_client_headers(request: web.Request) -> dict[str, str]:
    """Client headers an upstream may see: lower-cased, without the gateway's own key.

    When the gateway key took the `Authorization` header, a provider key can still be
    passed as `X-Provider-Authorization`.
    """
    headers = {
        name: request.headers[name]
        for name in ("authorization", "openai-organization", "openai-project", "openai-beta")
        if name in request.headers
    }
    if request.get(KEY_IN_AUTHORIZATION):
        headers.pop("authorization", None)
    provider = request.headers.get("X-Provider-Authorization")
    if provider:
        headers["authorization"] = provider
    return headers
