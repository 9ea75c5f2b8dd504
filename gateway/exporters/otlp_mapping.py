"""Span records, rollouts and rewards as OTLP protobuf, under the OpenTelemetry GenAI names.

Pure functions: the exporter, `spangate export --format otlp` and the tests share them.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack
from urllib.parse import urlsplit

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from config.models import DEFAULT_SERVICE_NAME, Settings
from config.version import package_version
from gateway.proxy.attribution import rollout_trace
from gateway.proxy.tool_items import chat_tool_call, objects_in

SCOPE_NAME = "spangate"
EVALUATION_EVENT = "gen_ai.evaluation.result"
MAX_ATTRIBUTE_CHARS = 32_000
FAILED_ROLLOUT_STATUSES = frozenset({"failed", "timeout"})
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
# Span kinds by name, for spans an agent sent us (kept in `spangate.span.kind`).
KINDS = {name.removeprefix("SPAN_KIND_").lower(): value for name, value in Span.SpanKind.items()}
# Span columns exported as GenAI attributes when they hold a value.
COLUMN_ATTRIBUTES = (
    ("operation", "gen_ai.operation.name"),
    ("request_model", "gen_ai.request.model"),
    ("response_model", "gen_ai.response.model"),
    ("response_id", "gen_ai.response.id"),
    ("input_tokens", "gen_ai.usage.input_tokens"),
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
    ("reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
    ("rollout_id", "rollout.id"),
    ("attempt_id", "rollout.attempt.id"),
    ("seq", "rollout.seq"),
    ("deployment", "spangate.deployment"),
    ("model_group", "spangate.model_group"),
    # The exported span is the gateway's client call to the upstream: its status is the
    # upstream's; what the agent got is `spangate.http_status`.
    ("upstream_status", "http.response.status_code"),
    ("http_status", "spangate.http_status"),
    ("retries", "spangate.upstream.retries"),
    ("cost_usd", "spangate.cost_usd"),
    ("overhead_ms", "spangate.overhead_ms"),
)
# Attributes the proxy records for its own bookkeeping; too bulky for a tracing backend.
SKIPPED_ATTRIBUTES = frozenset({"spangate.tries", "metadata"})


def any_value(value: Any) -> AnyValue:
    """A Python value as an OTLP AnyValue; what has no OTLP type goes as JSON text."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value[:MAX_ATTRIBUTE_CHARS])
    if isinstance(value, list | tuple) and all(
        isinstance(v, str | bool | int | float) for v in value
    ):
        result = AnyValue()
        result.array_value.values.extend(any_value(v) for v in value)
        return result
    text = orjson.dumps(value, default=str).decode()
    return AnyValue(string_value=text[:MAX_ATTRIBUTE_CHARS])


def key_values(attributes: Mapping[str, Any]) -> list[KeyValue]:
    return [
        KeyValue(key=key, value=any_value(value))
        for key, value in attributes.items()
        if value is not None
    ]


def _id(hex_text: str | None, size: int) -> bytes:
    if not hex_text:
        return b""
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        return b""
    return raw if len(raw) == size else b""


def _json_value(value: Any) -> Any:
    """Bodies arrive as raw bytes (plain calls) or decoded objects (streams, stored rows)."""
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return orjson.loads(bytes(value))
        except orjson.JSONDecodeError:
            return None
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of OpenAI's content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            text
            for part in content
            if isinstance(part, dict)
            and isinstance(text := part.get("text") or part.get("content"), str)
        ]
        return "".join(texts) if texts else None
    return None


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An OpenAI chat message as GenAI semantic-convention parts (text, tool calls, a tool's
    response): the shape `gen_ai.input.messages` / `gen_ai.output.messages` must have."""
    parts: list[dict[str, Any]] = []
    if message.get("role") == "tool":
        return [
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": _text_of(message.get("content")) or message.get("content"),
            }
        ]
    text = _text_of(message.get("content"))
    if text:
        parts.append({"type": "text", "content": text})
    for call in map(chat_tool_call, objects_in(message.get("tool_calls"))):
        parts.append(
            {
                "type": "tool_call",
                "id": call["id"],
                "name": call["name"],
                "arguments": call["arguments"],
            }
        )
    return parts


def _message(message: Any, finish_reason: Any = None) -> dict[str, Any] | None:
    if not isinstance(message, dict):
        return None
    out: dict[str, Any] = {"role": message.get("role") or "user", "parts": _parts(message)}
    if finish_reason is not None:
        out["finish_reason"] = finish_reason
    return out


def _input_messages(operation: str, body: Any) -> Any:
    if not isinstance(body, dict):
        return None
    if operation == "chat":
        messages = body.get("messages")
        found = [_message(m) for m in messages] if isinstance(messages, list) else []
        return [m for m in found if m is not None]
    if operation == "responses":
        given = body.get("input")
        if isinstance(given, str):
            return [{"role": "user", "parts": [{"type": "text", "content": given}]}]
        found = [_message(m) for m in given] if isinstance(given, list) else []
        return [m for m in found if m is not None]
    if operation == "text_completion":
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else _text_of(prompt)
        return [{"role": "user", "parts": [{"type": "text", "content": text}]}]
    return None


def _output_messages(operation: str, body: Any) -> Any:
    if not isinstance(body, dict):
        return None
    if operation == "chat":
        found = [
            _message(choice.get("message"), choice.get("finish_reason"))
            for choice in body.get("choices") or ()
            if isinstance(choice, dict)
        ]
        return [m for m in found if m is not None]
    if operation == "responses":
        texts = [
            _text_of(item.get("content"))
            for item in body.get("output") or ()
            if isinstance(item, dict) and item.get("type") == "message"
        ]
        text = "".join(t for t in texts if t)
        return [{"role": "assistant", "parts": [{"type": "text", "content": text}]}]
    if operation == "text_completion":
        return [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": choice.get("text")}],
                "finish_reason": choice.get("finish_reason"),
            }
            for choice in body.get("choices") or ()
            if isinstance(choice, dict)
        ]
    return None


# Where a shortened text part ends: the reader sees the text was cut, not that it ended.
CUT_MARK = "…"
# Part fields holding free text (or a tool's JSON arguments as text), shortened first.
TEXT_FIELDS = ("content", "arguments", "response")


def _texts(messages: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str]]:
    """(part, field) of every text inside `messages` (the GenAI `role` + `parts` shape)."""
    for message in messages:
        for part in message.get("parts") or ():
            for field in TEXT_FIELDS:
                if isinstance(part.get(field), str):
                    yield part, field


def _cap_for(lengths: list[int], excess: int) -> int:
    """The largest per-text length whose cut removes at least `excess` characters."""
    removed = 0
    ordered = sorted(lengths, reverse=True)
    for index, length in enumerate(ordered):
        following = ordered[index + 1] if index + 1 < len(ordered) else 0
        # The `index + 1` longest texts are at `length` now; lowering them to `following`
        # removes this many more characters.
        step = (length - following) * (index + 1)
        if removed + step >= excess:
            return max(length - -(-(excess - removed) // (index + 1)), 0)
        removed += step
    return 0


def messages_json(messages: Any, limit: int = MAX_ATTRIBUTE_CHARS) -> str | None:
    """`gen_ai.input.messages` / `gen_ai.output.messages` as JSON text of at most `limit`
    characters that still parses: backends (Phoenix's GenAI parser) read it as JSON, so a
    long conversation is cut inside its texts, then its trailing messages are left out,
    never in the middle of the JSON."""
    if messages is None:
        return None
    text = orjson.dumps(messages, default=str).decode()
    if len(text) <= limit or not isinstance(messages, list):
        return text if len(text) <= limit else None
    # Copies, so the record the exporter was handed is never changed.
    kept: list[dict[str, Any]] = [
        {**m, "parts": [dict(p) for p in m.get("parts") or ()]} for m in messages
    ]
    while len(text) > limit:
        found = [(part, field) for part, field in _texts(kept) if len(part[field]) > 1]
        if not found:
            break
        # Lengths as written in JSON (escapes count), so quotes or newlines are not over-cut;
        # the marks and rounding are measured again on the next round.
        written = [len(orjson.dumps(part[field])) - 2 for part, field in found]
        cap = _cap_for(written, len(text) - limit)
        for (part, field), size in zip(found, written, strict=True):
            if size > cap:
                keep = len(part[field]) * cap // size - len(CUT_MARK)
                part[field] = part[field][: max(keep, 0)] + CUT_MARK
        text = orjson.dumps(kept, default=str).decode()
    while len(text) > limit and kept:
        kept.pop()
        text = orjson.dumps(kept, default=str).decode()
    return text


def upstream_addresses(settings: Settings) -> dict[str, tuple[str, int]]:
    """`server.address`/`server.port` of each deployment label, from its `api_base`."""
    found: dict[str, tuple[str, int]] = {}
    for group in settings.models:
        for deployment in group.deployments:
            if not deployment.api_base or deployment.label in found:
                continue
            parts = urlsplit(deployment.api_base)
            if parts.hostname:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                found[deployment.label] = (parts.hostname, port)
    return found


def resource(service_name: str, version: str, instance_id: str | None = None) -> Resource:
    return Resource(
        attributes=key_values(
            {
                "service.name": service_name,
                "service.version": version,
                "service.instance.id": instance_id or socket.gethostname(),
            }
        )
    )


def parent_of(record: Mapping[str, Any]) -> str | None:
    """A call's parent: the caller's span (traceparent), else its rollout's root span."""
    if record.get("parent_span_id"):
        return record["parent_span_id"]
    rollout_id = record.get("rollout_id")
    if rollout_id:
        trace_id, root_id = rollout_trace(rollout_id)
        if record.get("trace_id") == trace_id:
            return root_id
    return None


class SpanOptions(TypedDict, total=False):
    """The options of `span_bytes`, which `span_proto` passes on as they are."""

    content: bool
    addresses: Mapping[str, tuple[str, int]] | None
    events: Sequence[Span.Event]


def span_proto(record: Mapping[str, Any], **options: Unpack[SpanOptions]) -> Span:
    """One span record (as published, or as stored) as an OTLP span."""
    return Span.FromString(span_bytes(record, **options))


# Serialized one-attribute spans by (key, type, value), for the text and integer attributes
# that repeat from span to span (model, provider, rollout, host, status, token counts):
# building a protobuf message costs about a microsecond per field in Python, copying cached
# bytes almost nothing. The type is in the key because True == 1: a bool must never answer
# for an int, nor an int for a bool.
_FRAGMENTS: dict[tuple[str, type, Any], bytes] = {}
MAX_FRAGMENTS = 20_000
# Different on every span: caching them would only churn the cache.
UNCACHED = frozenset({"gen_ai.response.id", "rollout.seq"})


def _fragment(key: str, value: str | int) -> bytes:
    cache_key = (key, type(value), value)
    cached = _FRAGMENTS.get(cache_key)
    if cached is None:
        kv = KeyValue(key=key, value=any_value(value))
        cached = Span(attributes=[kv]).SerializeToString()
        if len(_FRAGMENTS) >= MAX_FRAGMENTS:
            _FRAGMENTS.clear()
        _FRAGMENTS[cache_key] = cached
    return cached


def span_bytes(
    record: Mapping[str, Any],
    *,
    content: bool = False,
    addresses: Mapping[str, tuple[str, int]] | None = None,
    events: Sequence[Span.Event] = (),
) -> bytes:
    """The serialized OTLP span of one record. Serialized protobuf messages concatenate
    as a merge, so the repeated attributes come from a cache of protobuf's own output."""
    operation = record.get("operation") or ""
    given = record.get("attributes") or {}
    if isinstance(given, str):
        given = _json_value(given) or {}
    ingested = given.get("spangate.source") == "otlp"
    attributes: dict[str, Any] = {}
    if not ingested:
        for column, name in COLUMN_ATTRIBUTES:
            attributes[name] = record.get(column)
        if record.get("provider"):
            attributes["gen_ai.provider.name"] = record["provider"]
        if record.get("finish_reasons"):
            attributes["gen_ai.response.finish_reasons"] = list(record["finish_reasons"])
        if operation != "execute_tool":
            attributes["gen_ai.request.stream"] = bool(record.get("stream"))
        if record.get("ttft_ms") is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = record["ttft_ms"] / 1000
        address = (addresses or {}).get(record.get("deployment") or "")
        if address is not None:
            attributes["server.address"], attributes["server.port"] = address
    else:
        attributes["rollout.id"] = record.get("rollout_id")
        attributes["rollout.attempt.id"] = record.get("attempt_id")
        attributes["rollout.seq"] = record.get("seq")
    for key, value in given.items():
        if key not in SKIPPED_ATTRIBUTES and not key.startswith("spangate.span."):
            attributes[key] = value
    metadata = given.get("metadata") or record.get("metadata")
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            attributes[f"spangate.metadata.{key}"] = value
    if record.get("tags"):
        attributes["spangate.tags"] = list(record["tags"])
    status = Status()
    if record.get("status") == "error":
        status = Status(code=Status.STATUS_CODE_ERROR, message=record.get("error_message") or "")
        attributes["error.type"] = record.get("error_type") or "error"
    if operation == "execute_tool" and not ingested:
        kind = INTERNAL
        if content:
            request = _json_value(record.get("request_body")) or {}
            response = _json_value(record.get("response_body")) or {}
            if isinstance(request, dict):
                attributes["gen_ai.tool.call.arguments"] = request.get("arguments")
            if isinstance(response, dict):
                attributes["gen_ai.tool.call.result"] = response.get("content")
    elif ingested:
        kind = KINDS.get(str(given.get("spangate.span.kind")), INTERNAL)
    else:
        kind = CLIENT
        if content:
            attributes["gen_ai.input.messages"] = messages_json(
                _input_messages(operation, _json_value(record.get("request_body")))
            )
            attributes["gen_ai.output.messages"] = messages_json(
                _output_messages(operation, _json_value(record.get("response_body")))
            )
    varying: dict[str, Any] = {}
    fragments: list[bytes] = []
    for key, value in attributes.items():
        if value is None:
            continue
        if key in UNCACHED:
            varying[key] = value
        elif (isinstance(value, str) and len(value) <= 256) or (
            isinstance(value, int) and -(2**63) <= value < 2**63
        ):
            fragments.append(_fragment(key, value))
        else:
            varying[key] = value
    span = Span(
        trace_id=_id(record.get("trace_id"), 16),
        span_id=_id(record.get("span_id"), 8),
        parent_span_id=_id(parent_of(record), 8),
        name=record.get("name") or operation,
        kind=kind,
        start_time_unix_nano=int(record.get("start_ns") or 0),
        end_time_unix_nano=int(record.get("end_ns") or record.get("start_ns") or 0),
        attributes=key_values(varying),
    )
    if events:
        span.events.extend(events)
    if status.code:
        span.status.CopyFrom(status)
    return span.SerializeToString() + b"".join(fragments)


def evaluation_event(reward: Mapping[str, Any]) -> Span.Event:
    """A reward or judge verdict as a `gen_ai.evaluation.result` event."""
    details = reward.get("details") or {}
    if isinstance(details, str):
        details = _json_value(details) or {}
    label = details.get("label") if isinstance(details, dict) else None
    explanation = reward.get("comment") or (
        details.get("explanation") or details.get("reason") if isinstance(details, dict) else None
    )
    attributes: dict[str, Any] = {
        "gen_ai.evaluation.name": reward.get("name") or "reward",
        "gen_ai.evaluation.score.value": float(reward.get("value") or 0.0),
        "gen_ai.evaluation.score.label": label if isinstance(label, str) else None,
        "gen_ai.evaluation.explanation": explanation if isinstance(explanation, str) else None,
        "reward.id": reward.get("id"),
        "reward.source": reward.get("source"),
        "reward.final": bool(reward.get("final")),
    }
    dimensions = reward.get("dimensions") or {}
    if isinstance(dimensions, str):
        dimensions = _json_value(dimensions) or {}
    for name, value in dimensions.items() if isinstance(dimensions, dict) else ():
        attributes[f"reward.dimensions.{name}"] = value
    return Span.Event(
        time_unix_nano=int(reward.get("created_ns") or 0),
        name=EVALUATION_EVENT,
        attributes=key_values(attributes),
    )


def root_span(rollout: Mapping[str, Any], rewards: Iterable[Mapping[str, Any]] = ()) -> Span:
    """The rollout's `invoke_agent` span: every call without a caller's trace hangs under it."""
    trace_id, root_id = rollout_trace(rollout["id"])
    status = Status()
    if rollout.get("status") in FAILED_ROLLOUT_STATUSES:
        status = Status(code=Status.STATUS_CODE_ERROR, message=f"rollout {rollout['status']}")
    agent = rollout.get("agent")
    attributes = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "rollout.id": rollout["id"],
        "rollout.status": rollout.get("status"),
        "spangate.tags": list(rollout.get("tags") or []) or None,
    }
    metadata = rollout.get("metadata")
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            attributes[f"spangate.metadata.{key}"] = value
    if rollout.get("status") in FAILED_ROLLOUT_STATUSES:
        attributes["error.type"] = rollout["status"]
    start = int(rollout.get("created_ns") or 0)
    return Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(root_id),
        name=f"invoke_agent {agent or rollout['id']}",
        kind=INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=int(rollout.get("ended_ns") or rollout.get("updated_ns") or start),
        attributes=key_values(attributes),
        events=[evaluation_event(r) for r in rewards],
        status=status,
    )


def evaluation_span(reward: Mapping[str, Any], *, trace_id: str, parent_id: str) -> Span:
    """A reward that came after the span it judges was sent (spans cannot change once
    exported): a zero-length child of its target carrying the evaluation event."""
    from gateway.proxy.attribution import new_span_id

    at = int(reward.get("created_ns") or 0)
    name = reward.get("name") or "reward"
    return Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(new_span_id()),
        parent_span_id=bytes.fromhex(parent_id),
        name=f"evaluation {name}",
        kind=INTERNAL,
        start_time_unix_nano=at,
        end_time_unix_nano=at,
        attributes=key_values(
            {
                "gen_ai.operation.name": "evaluation",
                "gen_ai.evaluation.name": name,
                "rollout.id": reward.get("rollout_id"),
                "rollout.attempt.id": reward.get("attempt_id"),
            }
        ),
        events=[evaluation_event(reward)],
    )


def export_request(
    spans: Iterable[Span | bytes], resource_: Resource, version: str
) -> ExportTraceServiceRequest:
    """One request holding `spans` (messages, or serialized spans from `span_bytes`)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(resource_)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.CopyFrom(InstrumentationScope(name=SCOPE_NAME, version=version))
    for span in spans:
        # add() + merge fills the request in place; a list of messages would be copied.
        target = scope_spans.spans.add()
        if isinstance(span, bytes):
            target.MergeFromString(span)
        else:
            target.CopyFrom(span)
    return request


_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


def _hex_ids(value: Any) -> Any:
    """protobuf's JSON writes bytes as base64; OTLP/JSON wants trace and span ids as hex."""
    if isinstance(value, dict):
        return {
            key: base64.b64decode(item).hex() if key in _ID_FIELDS else _hex_ids(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_hex_ids(item) for item in value]
    return value


def to_otlp_json(request: ExportTraceServiceRequest) -> bytes:
    return orjson.dumps(to_otlp_dict(request))


def to_otlp_dict(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON object: camelCase keys, enums as numbers, ids as hex."""
    return _hex_ids(json_format.MessageToDict(request, use_integers_for_enums=True))


def iter_otlp_json(
    rollouts: Iterable[Mapping[str, Any]],
    *,
    service_name: str = DEFAULT_SERVICE_NAME,
    content: bool = False,
) -> Iterator[dict[str, Any]]:
    """Stored rollouts (as `store.export.iter_rollouts` shapes them) as OTLP/JSON trace
    exports, one per rollout, holding what the live exporter would have sent."""
    version = package_version()
    resource_ = resource(service_name, version)
    for rollout in rollouts:
        calls = list(rollout.get("unattributed_calls") or [])
        rewards = list(rollout.get("rewards") or [])
        for attempt in rollout.get("attempts") or []:
            calls.extend(attempt.get("calls") or [])
            rewards.extend(attempt.get("rewards") or [])
        on_root = [r for r in rewards if not r.get("span_id")]
        by_span: dict[str, list[Mapping[str, Any]]] = {}
        for reward in rewards:
            if reward.get("span_id"):
                by_span.setdefault(reward["span_id"], []).append(reward)
        # Offline, every reward is known: each goes on the span it targets.
        spans = [
            span_proto(
                call,
                content=content,
                events=[evaluation_event(r) for r in by_span.get(call["span_id"], [])],
            )
            for call in calls
        ]
        spans.append(root_span(rollout, on_root))
        yield to_otlp_dict(export_request(spans, resource_, version))
