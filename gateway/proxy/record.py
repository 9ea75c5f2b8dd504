"""The shape of a span record, defined once: what `Call.publish()` and the tool spans build,
what the recorder bus carries, what the store's columns hold (`store.schema.SPAN_COLUMNS`,
checked equal by tests/test_span_shape.py) and what the API's `Span` model exposes."""

from __future__ import annotations

from typing import Any, TypeAlias, TypedDict, Union

from gateway.providers.base import JSONValue

# A stored body: JSON, or raw bytes (audio, a form's file).
Body: TypeAlias = Union[JSONValue, bytes]  # noqa: UP007


class SpanRecord(TypedDict):
    span_id: str
    trace_id: str
    parent_span_id: str | None
    rollout_id: str | None
    attempt_id: str | None
    seq: int | None
    name: str
    operation: str
    provider: str | None
    deployment: str | None
    model_group: str | None
    request_model: str | None
    response_model: str | None
    response_id: str | None
    status: str
    http_status: int | None
    error_type: str | None
    error_message: str | None
    stream: int
    start_ns: int
    end_ns: int
    duration_ms: float
    ttft_ms: float | None
    upstream_ms: float | None
    overhead_ms: float | None
    retries: int
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    cost_usd: float | None
    finish_reasons: list[str] | None
    tool_calls: list[dict[str, Any]] | None
    request_body: Body
    response_body: Body
    attributes: dict[str, Any]
    tags: list[str]
    prompt_token_ids: str | None
    completion_token_ids: str | None
    logprobs: str | None
    model_version: str | None
    mode: str | None
    held_ms: float | None
    upstream_status: int | None
    # Not span columns: they create the span's rollout on first sight.
    agent: str | None
    metadata: dict[str, str] | None


# Keys of a record that are not columns of the spans table.
ROLLOUT_FIELDS = ("agent", "metadata")
SPAN_FIELDS: tuple[str, ...] = tuple(
    k for k in SpanRecord.__annotations__ if k not in ROLLOUT_FIELDS
)
