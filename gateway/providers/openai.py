"""The seam to model providers: one callable `provider(request) -> UpstreamResponse` per kind.

OpenAI-compatible upstreams get the client's body forwarded as-is through one shared
aiohttp session; aiohttp's exceptions become `UpstreamError`s here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping

import aiohttp
from yarl import URL

from gateway.errors import (
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from gateway.providers.base import UpstreamRequest, UpstreamResponse
from gateway.providers.headers import client_headers_for

# Headers that describe one hop, or that aiohttp recomputes, never pass through.
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


def forwardable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}


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


async def _iter_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except TimeoutError as exc:
        raise UpstreamTimeout("upstream stream timed out") from exc
    except aiohttp.ClientPayloadError as exc:
        raise UpstreamProtocolError(f"upstream stream broke: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"upstream stream failed: {exc}") from exc
    finally:
        response.release()


async def _read_at_most(response: aiohttp.ClientResponse, limit: int, label: str) -> bytes:
    """The body, refused once it passes `limit` bytes (decompressed), before it is all in memory.

    `response.read()` would hold whatever the upstream sends; a declared length over the
    limit is refused before reading a byte, an undeclared one as soon as it passes it.
    """
    declared = response.content_length
    if declared is not None and declared > limit:
        response.close()
        raise _too_large(label, limit)
    if declared is not None and response.headers.get("Content-Encoding", "") in _UNENCODED:
        # A declared, unencoded length within the limit is all there is: one read.
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            # close(), not release(): the rest of the body is never read off the socket.
            response.close()
            raise _too_large(label, limit)
    return bytes(body)


# Built only when raised: the message passes through `scrub`, which a success should not pay.
def _too_large(label: str, limit: int) -> UpstreamTooLarge:
    return UpstreamTooLarge(
        f"upstream {label} answered with a body over {limit} bytes (limits.max_upstream_body_bytes)"
    )


_UNENCODED = frozenset({"", "identity"})


@functools.lru_cache(maxsize=1024)
def _upstream_url(api_base: str | None, path: str) -> URL | str:
    """Parsed once per deployment and path, not on every call; a URL that does not
    parse stays text, so aiohttp refuses it as before (`UpstreamUnreachable`)."""
    url = (api_base or "").rstrip("/") + path
    try:
        return URL(url)
    except ValueError:
        return url


@functools.lru_cache(maxsize=256)
def _client_timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=connect)


class OpenAICompatible:
    """Any OpenAI-compatible API (OpenAI, vLLM, Ollama, OpenRouter, ...) over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, *, max_body_bytes: int) -> None:
        self.session = session
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: UpstreamRequest) -> UpstreamResponse:
        deployment = request.deployment
        url = _upstream_url(deployment.api_base, request.path)
        timeout = _client_timeout(deployment.timeout.total, deployment.timeout.connect)
        try:
            response = await self.session.request(
                request.method,
                url,
                data=request.body or None,
                params=request.query or None,
                headers=upstream_headers(request),
                timeout=timeout,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {deployment.label} did not answer in time") from exc
        except aiohttp.ClientError as exc:
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
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(
                f"upstream {deployment.label} failed mid-body: {exc}"
            ) from exc
        finally:
            response.release()
        return UpstreamResponse(response.status, headers, body=body)
