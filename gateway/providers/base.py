"""The seam to models: what a provider is given, what it gives back, and what it is.

A provider is any `async (UpstreamRequest) -> UpstreamResponse`; the mock is just another one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, Union
from urllib.parse import quote

from config.models import Deployment
from gateway.errors import UpstreamTooLarge

OPERATION_PATHS = {
    "chat": "/chat/completions",
    "text_completion": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
    "moderations": "/moderations",
    "audio_speech": "/audio/speech",
    "audio_transcription": "/audio/transcriptions",
    "audio_translation": "/audio/translations",
    "image_generation": "/images/generations",
    "image_edit": "/images/edits",
    "image_variation": "/images/variations",
    "input_tokens": "/responses/input_tokens",
}
# Operations on a stored response, by id: sent to the deployment that made it.
RESPONSE_OPERATIONS = {
    "responses_retrieve": ("GET", ""),
    "responses_delete": ("DELETE", ""),
    "responses_cancel": ("POST", "/cancel"),
    "responses_input_items": ("GET", "/input_items"),
}

# JSON as orjson decodes it (`Union`: a recursive alias must stay valid at runtime).
JSONValue: TypeAlias = Union[bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"], None]  # noqa: UP007


@dataclass(slots=True)
class UpstreamRequest:
    """One call to send: the body is already final (model rewritten if needed)."""

    operation: str
    body: bytes
    payload: dict[str, JSONValue]
    stream: bool
    deployment: Deployment
    client_headers: Mapping[str, str] = field(default_factory=dict)
    # A multipart form (audio, image edits) says so, with its boundary.
    content_type: str = "application/json"
    # Set for the operations on a stored response: its id, and the query passed along.
    response_id: str | None = None
    query: Mapping[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return RESPONSE_OPERATIONS.get(self.operation, ("POST", ""))[0]

    @property
    def path(self) -> str:
        """The path under the deployment's `api_base`."""
        if self.response_id is not None:
            suffix = RESPONSE_OPERATIONS[self.operation][1]
            return f"/responses/{quote(self.response_id, safe='')}{suffix}"
        return OPERATION_PATHS[self.operation]


@dataclass(slots=True)
class UpstreamResponse:
    """What came back: headers at once, then either the whole body or its chunks."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    chunks: AsyncGenerator[bytes, None] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Provider(Protocol):
    """A way to reach a model; the mock is just another one."""

    def __call__(self, request: UpstreamRequest) -> Awaitable[UpstreamResponse]: ...


# Built only when raised: the message passes through `scrub`, which a success should not pay.
def too_large(label: str, limit: int) -> UpstreamTooLarge:
    return UpstreamTooLarge(
        f"upstream {label} answered with a body over {limit} bytes (limits.max_upstream_body_bytes)"
    )
