"""API keys and scopes: which key may call which route, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiMapping

from config.models import ApiKey
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.providers.headers import never_forwarded

OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/openapi.json"})
# The dashboard's sign-in form and its static files must load before anyone has signed in.
UI_OPEN_PATHS = frozenset({"/ui/login", "/ui/logout"})
UI_STATIC = "/ui/static/"
# The dashboard keeps the key it was given in this cookie (HttpOnly, SameSite=Strict).
UI_COOKIE = "spangate_key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMIN_PREFIXES = ("/api/models", "/api/proxy/")


def required_scope(method: str, path: str) -> str | None:
    if path in OPEN_PATHS or path in UI_OPEN_PATHS or path.startswith(UI_STATIC):
        return None
    if _is_ui(path):
        return "read"
    if path.startswith("/api/") or path == "/metrics":
        if method in SAFE_METHODS:
            return "read"
        # Changing what serves calls, or stopping them, is an operator's job.
        return "admin" if path.startswith(ADMIN_PREFIXES) else "write"
    return "proxy"


def _is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def can_read(key: ApiKey) -> bool:
    return "read" in key.scopes or "admin" in key.scopes


def _cookie_key(request: web.Request) -> str | None:
    """The dashboard's cookie, taken only for reads of pages and the API they call.

    Never for writes (a cookie rides along on requests other sites trigger) and never for the
    OpenAI routes (a browser session must not spend provider money).
    """
    if request.method not in SAFE_METHODS:
        return None
    if not (_is_ui(request.path) or request.path.startswith("/api/")):
        return None
    return request.cookies.get(UI_COOKIE) or None


def _to_sign_in(request: web.Request) -> web.Response:
    target = "/ui/login?" + urlencode({"next": request.path_qs})
    return web.Response(status=303, headers={"Location": target})


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
    try:
        given = presented.encode()
    except UnicodeEncodeError:
        # Bytes that were not UTF-8 (aiohttp keeps them as lone surrogates): no key is.
        return None
    for key in keys:
        if hmac.compare_digest(key.key.encode(), given):
            found = key
    return found


def admit_key(keys: list[ApiKey], presented: str | None, scope: str) -> None:
    """Raise unless `presented` is one of `keys` and holds `scope` (or is an admin's)."""
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


def auth_middleware(keys: list[ApiKey]) -> web.Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        scope = required_scope(request.method, request.path)
        if scope is None:
            return await handler(request)
        presented = presented_key(request.headers) or _cookie_key(request)
        # A person at a page is sent to the sign-in form rather than shown a JSON error.
        page = _is_ui(request.path) and request.method in SAFE_METHODS
        if page and (presented is None or find_key(keys, presented) is None):
            return _to_sign_in(request)
        admit_key(keys, presented, scope)
        return await handler(request)

    return middleware


def forwarded_client_headers(
    sent: MultiMapping[str], gateway_keys: Collection[str]
) -> dict[str, str]:
    """Client headers an upstream may see: lower-cased, and none that carries a gateway key.

    Every header but the ones never forwarded (`gateway.providers.headers`): the deployment's
    `forward_headers` narrows them further. The gateway key may ride in several headers at
    once, or in a repeated one, so every value is checked rather than the one the key was taken
    from. A provider key the client brings comes in `Authorization` (when the gateway key came
    elsewhere) or in `X-Provider-Authorization`, which wins.
    """

    def first_clean(name: str) -> str | None:
        for value in sent.getall(name, ()):
            if not any(key in value for key in gateway_keys):
                return value
        return None

    headers = {}
    for raw_name in sent:
        name = raw_name.lower()
        if name in headers or (name != "authorization" and never_forwarded(name)):
            continue
        value = first_clean(name)
        if value is not None:
            headers[name] = value
    if "X-Provider-Authorization" in sent:
        provider = first_clean("X-Provider-Authorization")
        if provider:
            headers["authorization"] = provider
    return headers
