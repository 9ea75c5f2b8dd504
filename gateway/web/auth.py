"""API keys and scopes: which key may call which route, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping

from aiohttp import web

from config.models import ApiKey
from gateway.errors import AuthenticationFailed, GatewayError

OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/openapi.json"})
ADMIN_PREFIXES = ("/api/models", "/api/proxy/")


class PermissionDenied(GatewayError):
    """The key is valid but lacks the scope the route needs."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


def required_scope(method: str, path: str) -> str | None:
    if path in OPEN_PATHS:
        return None
    if path.startswith("/api/") or path == "/metrics":
        if method in ("GET", "HEAD", "OPTIONS"):
            return "read"
        # Changing what serves calls, or stopping them, is an operator's job.
        return "admin" if path.startswith(ADMIN_PREFIXES) else "write"
    return "proxy"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key the client sent: `X-Api-Key`, `api-key` (Azure clients), or a bearer token."""
    for name in ("X-Api-Key", "api-key"):
        explicit = headers.get(name)
        if explicit:
            return explicit.strip()
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


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
        presented = presented_key(request.headers)
        if presented is None:
            raise AuthenticationFailed(
                "missing API key: send `Authorization: Bearer <key>`, `X-Api-Key: <key>` "
                "or `api-key: <key>`"
            )
        key = find_key(keys, presented)
        if key is None:
            raise AuthenticationFailed("invalid API key")
        if scope not in key.scopes and "admin" not in key.scopes:
            raise PermissionDenied(f"this key lacks the {scope!r} scope")
        return await handler(request)

    return middleware


def forwarded_client_headers(request: web.Request, gateway_keys: Collection[str]) -> dict[str, str]:
    """Client headers an upstream may see: lower-cased, and none that carries a gateway key.

    The gateway key may ride in several headers at once, or in a repeated one, so every value
    is checked rather than the one the key was taken from. A provider key the client brings
    comes in `Authorization` (when the gateway key came elsewhere) or in
    `X-Provider-Authorization`, which wins.
    """

    def first_clean(name: str) -> str | None:
        for value in request.headers.getall(name, ()):
            if not any(key in value for key in gateway_keys):
                return value
        return None

    headers = {}
    for name in ("authorization", "openai-organization", "openai-project", "openai-beta"):
        value = first_clean(name)
        if value is not None:
            headers[name] = value
    provider = first_clean("X-Provider-Authorization")
    if provider:
        headers["authorization"] = provider
    return headers
