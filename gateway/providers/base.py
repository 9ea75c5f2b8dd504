"""The seam to models: what a provider is given, what it gives back, and what it is.

A provider is any `async (UpstreamRequest) -> UpstreamResponse`; the mock is just another one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from config.models import Deployment

OPERATION_PATHS = {
    "chat": "/chat/completions",
    "text_completion": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}


@dataclass(slots=True)
class UpstreamRequest:
    """One call to send: the body is already final (model rewritten if needed)."""

    operation: str
    body: bytes
    payload: dict[str, Any]
    stream: bool
    deployment: Deployment
    client_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class UpstreamResponse:
    """What came back: headers at once, then either the whole body or its chunks."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Provider(Protocol):
    """A way to reach a model; the mock is just another one."""

    def __call__(self, request: UpstreamRequest) -> Awaitable[UpstreamResponse]: ...
