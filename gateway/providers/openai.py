"""The seam to model providers: one callable `provider(request) -> UpstreamResponse` per kind.

OpenAI-compatible upstreams get the client's body forwarded as-is through one shared
connection pool (providers/http1.py); its exceptions become `UpstreamError`s here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Iterable
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import (
    UpstreamConnectionLost,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.providers.base import UpstreamRequest, UpstreamResponse, too_large
from gateway.providers.headers import client_headers_for
from gateway.providers.http1 import (
    BodyOverLimit,
    ConnectionPool,
    HTTPClientError,
    Response,
    StaleConnection,
    Target,
    parse_target,
)

# Headers that describe one hop, or that the gateway recomputes, never pass through.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "set-cookie",
    }
)


def forwardable_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}


def upstream_headers(request: UpstreamRequest) -> dict[str, str]:
    """The client's headers as the deployment allows, with its own key if configured, else
    the client's (never stored)."""
    headers = client_headers_for(request.deployment, request.client_headers)
    if request.body:
        headers["content-type"] = request.content_type
    key = request.deployment.api_key
    if key:
        headers["authorization"] = f"Bearer {key}"
    elif "authorization" in request.client_headers:
        headers["authorization"] = request.client_headers["authorization"]
    if request.stream:
        headers["accept"] = "text/event-stream"
    return headers


async def _iter_chunks(response: Response) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in response.iter_chunks():
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeout("upstream stream timed out") from exc
    except HTTPClientError as exc:
        raise UpstreamProtocolError(f"upstream stream broke: {exc}") from exc
    finally:
        response.release()


async def _read_at_most(response: Response, limit: int, label: str) -> bytes:
    """The body, refused once it passes `limit` bytes (decoded), before it is all in memory.

    A declared length over the limit is refused before reading a byte, an undeclared one as
    soon as it passes it.
    """
    declared = response.content_length
    if declared is not None and declared > limit and not response.encoded:
        response.close()
        raise too_large(label, limit)
    try:
        return await response.read(limit)
    except BodyOverLimit:
        # close(), not release(): the rest of the body is never read off the socket.
        response.close()
        raise too_large(label, limit) from None


@functools.lru_cache(maxsize=1024)
def _upstream_target(api_base: str | None, path: str) -> Target | str:
    """Split once per deployment and path, not on every call; a URL that does not parse
    stays text, and the call fails as unreachable. The operation's path goes before any query
    of the base (Azure's `?api-version=`)."""
    url = (api_base or "").rstrip("/") + path
    try:
        parts = urlsplit(api_base or "")
        url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + path))
        return parse_target(url)
    except ValueError:
        return url


class OpenAICompatible:
    """Any OpenAI-compatible API (OpenAI, vLLM, Ollama, OpenRouter, ...) over a shared pool."""

    def __init__(self, pool: ConnectionPool, *, max_body_bytes: int) -> None:
        self.pool = pool
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        deployment = request.deployment
        target = _upstream_target(deployment.api_base, request.path)
        try:
            if isinstance(target, str):
                raise HTTPClientError(f"not an http(s) URL: {target!r}")
            response = await self.pool.request(
                request.method,
                target,
                headers=upstream_headers(request),
                body=request.body,
                query=request.query,
                total=deployment.timeout.total,
                connect=deployment.timeout.connect,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {deployment.label} did not answer in time") from exc
        except StaleConnection as exc:
            raise UpstreamConnectionLost(
                f"upstream {deployment.label} closed a kept-alive connection before answering: "
                f"{exc}"
            ) from exc
        except HTTPClientError as exc:
            raise UpstreamUnreachable(f"upstream {deployment.label} unreachable: {exc}") from exc
        headers = forwardable_headers(response.headers)
        streaming = request.stream and response.content_type == "text/event-stream"
        if streaming and 200 <= response.status < 300:
            return UpstreamResponse(response.status, headers, chunks=_iter_chunks(response))
        try:
            body = await _read_at_most(response, self.max_body_bytes, deployment.label)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream {deployment.label} timed out sending its body"
            ) from exc
        except HTTPClientError as exc:
            raise UpstreamUnreachable(
                f"upstream {deployment.label} failed mid-body: {exc}"
            ) from exc
        finally:
            response.release()
        return UpstreamResponse(response.status, headers, body=body)
