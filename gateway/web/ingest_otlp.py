"""`POST /v1/traces`: agents' own OpenTelemetry spans (OTLP/HTTP) join their rollout.

A span joins the rollout its attributes name (`rollout.id`, or Agent Lightning's
`agentlightning.rollout_id`), else the rollout of a gateway call in the same trace. It is
stored through the recorder like any call, so it takes the writer's safe path.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import (
    BodyTooLarge,
    InvalidRequest,
    ServiceUnavailable,
    UnreadableBody,
    UnsupportedMediaType,
)
from gateway.proxy.attribution import valid_id
from gateway.web.state import GATEWAY, Gateway
from store.queries import recorded_span_ids, rollouts_of_traces

log = logging.getLogger("spangate.ingest")

ROLLOUT_KEYS = ("rollout.id", "agentlightning.rollout_id")
ATTEMPT_KEYS = ("rollout.attempt.id", "agentlightning.attempt_id")
# Trace id -> (rollout, attempt) of recent gateway calls, for spans that name no rollout.
TRACES_REMEMBERED = 100_000
# Span ids recently taken, so an exporter re-sending an export whose answer it missed gets no
# second copy (nor new seq numbers) while the first may still be on its way to the store.
SPANS_REMEMBERED = 100_000
# Spans published between two turns the event loop gets, so a large export does not hold up
# every other request.
PUBLISH_BATCH = 500
MAX_NAME_CHARS = 1_000
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# The gateway's own attributes: an agent's span may not set them (the dashboard, the metrics
# and the call counts read them), so its own are kept under this prefix instead.
OWN_PREFIX = "spangate."
AGENT_PREFIX = "agent."
ZERO_TRACE_ID, ZERO_SPAN_ID = bytes(16), bytes(8)
_KIND_NAMES = {
    value: name.removeprefix("SPAN_KIND_").lower() for name, value in Span.SpanKind.items()
}
# Span attributes that fill span columns when an agent's instrumentation sets them.
_COLUMNS = {
    "gen_ai.request.model": "request_model",
    "gen_ai.response.model": "response_model",
    "gen_ai.response.id": "response_id",
    "gen_ai.provider.name": "provider",
    "gen_ai.usage.input_tokens": "input_tokens",
    "gen_ai.usage.output_tokens": "output_tokens",
    "gen_ai.usage.cache_read.input_tokens": "cached_tokens",
    "gen_ai.usage.reasoning.output_tokens": "reasoning_tokens",
}


@dataclass
class IngestStats:
    accepted: int = 0
    rejected: int = 0


class TraceIndex:
    """Recorder subscriber: which rollout each recent trace belongs to (bounded)."""

    def __init__(
        self, capacity: int = TRACES_REMEMBERED, spans_capacity: int = SPANS_REMEMBERED
    ) -> None:
        self._capacity = capacity
        self._traces: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._spans_capacity = spans_capacity
        self._spans: OrderedDict[str, None] = OrderedDict()
        self.stats = IngestStats()

    def on_span(self, record: Mapping[str, Any]) -> None:
        rollout_id = record.get("rollout_id")
        if rollout_id:
            self.note(record["trace_id"], rollout_id, record.get("attempt_id"))

    def note(self, trace_id: str, rollout_id: str, attempt_id: str | None) -> None:
        self._traces[trace_id] = (rollout_id, attempt_id)
        self._traces.move_to_end(trace_id)
        if len(self._traces) > self._capacity:
            self._traces.popitem(last=False)

    def get(self, trace_id: str) -> tuple[str, str | None] | None:
        # Also called from the parsing thread: a single dict lookup, atomic under the GIL.
        return self._traces.get(trace_id)

    def first_time(self, span_id: str) -> bool:
        """Whether the span id is new to this process's recent ingests (and notes it)."""
        if span_id in self._spans:
            return False
        self._spans[span_id] = None
        if len(self._spans) > self._spans_capacity:
            self._spans.popitem(last=False)
        return True


TRACE_INDEX = web.AppKey("trace_index", TraceIndex)


class IngestCollector(Collector):
    """`spangate_otlp_spans_ingested` / `_ingest_rejected`, read at scrape time."""

    def __init__(self, index: TraceIndex) -> None:
        self.index = index

    def collect(self) -> Iterator[Metric]:
        stats = self.index.stats
        yield GaugeMetricFamily(
            "spangate_otlp_spans_ingested",
            "Agent spans taken on POST /v1/traces.",
            value=stats.accepted,
        )
        yield GaugeMetricFamily(
            "spangate_otlp_spans_ingest_rejected",
            "Agent spans refused on POST /v1/traces (no rollout, bad ids).",
            value=stats.rejected,
        )


# -- decoding ---------------------------------------------------------------------------


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the trace export is over {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the trace export is over {limit} bytes")
            chunks.append(chunk)
    except (ContentEncodingError, web.RequestPayloadError) as exc:
        # aiohttp reports a corrupt or cut gzip/deflate stream as a payload error.
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(
            f"the body could not be read as Content-Encoding {encoding!r}: {exc}"
        ) from exc
    return b"".join(chunks)


_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})
# What an id that is not hex becomes: one byte, a length no id has, so the span it belongs to
# is rejected on its own (as a protobuf id of the wrong length is), not the whole export.
_MALFORMED_ID = base64.b64encode(b"\0").decode()


def _b64_ids(value: Any) -> Any:
    """OTLP/JSON writes ids as hex; protobuf's JSON parser wants base64."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in _ID_KEYS and isinstance(item, str):
                try:
                    item = base64.b64encode(bytes.fromhex(item)).decode()
                except ValueError:
                    item = _MALFORMED_ID
            out[key] = _b64_ids(item)
        return out
    if isinstance(value, list):
        return [_b64_ids(item) for item in value]
    return value


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    if content_type == JSON:
        try:
            data = orjson.loads(body)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__} where an object belongs")
            json_format.ParseDict(_b64_ids(data), message, ignore_unknown_fields=True)
        except (orjson.JSONDecodeError, json_format.ParseError, TypeError) as exc:
            raise InvalidRequest(f"the body is not an OTLP/JSON trace export: {exc}") from exc
    else:
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            raise InvalidRequest(f"the body is not an OTLP protobuf trace export: {exc}") from exc
    return message


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def _first(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = attributes.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


def _valid_id(value: str | None) -> bool:
    return value is None or valid_id(value)


def _malformed_ids(span: Span) -> bool:
    """W3C and OTLP: 16-byte trace ids and 8-byte span ids, never all zeros; the parent is
    empty (a root) or a span id."""
    return (
        len(span.trace_id) != 16
        or len(span.span_id) != 8
        or span.trace_id == ZERO_TRACE_ID
        or span.span_id == ZERO_SPAN_ID
        or len(span.parent_span_id) not in (0, 8)
    )


NO_ROLLOUT = "no rollout: set rollout.id or share a trace with a gateway call"
# A span that names no rollout, waiting for its trace to be looked up in the store.
Unplaced = tuple[Span, dict[str, Any], dict[str, Any], str]


@dataclass
class Parsed:
    records: list[dict[str, Any]]
    rejected: int
    reasons: list[str]
    # Trace id -> its spans that name no rollout, share no trace with one that does in the
    # export, and whose trace this process has not seen a call of.
    unplaced: dict[str, list[Unplaced]] = field(default_factory=dict)

    def reject(self, count: int, reason: str) -> None:
        self.rejected += count
        if reason not in self.reasons:
            self.reasons.append(reason)

    def place(self, found: Mapping[str, tuple[str, str | None]]) -> None:
        """Unplaced spans join the rollout of a stored call of their trace, or are rejected."""
        for trace_id, spans in self.unplaced.items():
            if trace_id not in found:
                self.reject(len(spans), NO_ROLLOUT)
                continue
            rollout, attempt = found[trace_id]
            for span, attributes, resource_attributes, scope in spans:
                self.records.append(
                    _record(span, attributes, resource_attributes, scope, rollout, attempt)
                )
        self.unplaced = {}


def to_records(message: ExportTraceServiceRequest, index: TraceIndex) -> Parsed:
    """Span records (without seq) for every span that finds its rollout in the export or in
    `index`; the malformed rejected; those of other traces left to look up (`unplaced`)."""
    candidates: list[tuple[dict[str, Any], dict[str, Any], Span, str]] = []
    for resource_spans in message.resource_spans:
        resource_attributes = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                candidates.append((resource_attributes, _attributes(span.attributes), span, scope))
    # A trace that names its rollout anywhere in this export takes all its spans along.
    named: dict[str, tuple[str, str | None]] = {}
    for resource_attributes, attributes, span, _ in candidates:
        merged = {**resource_attributes, **attributes}
        rollout = _first(merged, ROLLOUT_KEYS)
        if rollout and not _malformed_ids(span):
            named.setdefault(span.trace_id.hex(), (rollout, _first(merged, ATTEMPT_KEYS)))
    parsed = Parsed([], 0, [])
    for resource_attributes, attributes, span, scope in candidates:
        if _malformed_ids(span):
            parsed.reject(
                1, "trace ids must be 16 bytes and span ids 8, in hex in JSON, not all zeros"
            )
            continue
        merged = {**resource_attributes, **attributes}
        trace_id = span.trace_id.hex()
        rollout = _first(merged, ROLLOUT_KEYS)
        attempt = _first(merged, ATTEMPT_KEYS)
        if rollout is None:
            rollout, attempt = named.get(trace_id) or index.get(trace_id) or (None, None)
        if rollout is None:
            unplaced = (span, attributes, resource_attributes, scope)
            parsed.unplaced.setdefault(trace_id, []).append(unplaced)
        elif not (_valid_id(rollout) and _valid_id(attempt)):
            parsed.reject(
                1, "rollout.id and rollout.attempt.id must be letters, digits and ._:@+=~-"
            )
        else:
            parsed.records.append(
                _record(span, attributes, resource_attributes, scope, rollout, attempt)
            )
    return parsed


def _record(
    span: Span,
    attributes: dict[str, Any],
    resource_attributes: dict[str, Any],
    scope: str,
    rollout_id: str,
    attempt_id: str | None,
) -> dict[str, Any]:
    operation = attributes.get("gen_ai.operation.name")
    if not isinstance(operation, str) or not operation:
        operation = "agent"
    failed = span.status.code == Status.STATUS_CODE_ERROR
    start = span.start_time_unix_nano
    end = max(span.end_time_unix_nano, start)
    kept = {
        **{AGENT_PREFIX + k if k.startswith(OWN_PREFIX) else k: v for k, v in attributes.items()},
        "spangate.source": "otlp",
        "spangate.span.kind": _KIND_NAMES.get(span.kind, "internal"),
    }
    if scope:
        kept["otel.scope.name"] = scope
    service = resource_attributes.get("service.name")
    if isinstance(service, str):
        kept["service.name"] = service
    record: dict[str, Any] = {
        "span_id": span.span_id.hex(),
        "trace_id": span.trace_id.hex(),
        # An all-zero parent is no parent: some exporters write one for a root span.
        "parent_span_id": (
            span.parent_span_id.hex()
            if span.parent_span_id and span.parent_span_id != ZERO_SPAN_ID
            else None
        ),
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "seq": None,
        "name": (span.name or operation)[:MAX_NAME_CHARS],
        "operation": operation,
        "status": "error" if failed else "ok",
        "http_status": None,
        "upstream_status": None,
        "error_type": (str(attributes.get("error.type") or "error")) if failed else None,
        "error_message": (span.status.message or None) if failed else None,
        "stream": 0,
        "start_ns": start,
        "end_ns": end,
        "duration_ms": (end - start) / 1e6,
        "retries": 0,
        "attributes": kept,
        "tags": [],
    }
    for key, column in _COLUMNS.items():
        value = attributes.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            record[column] = value
    if operation == "execute_tool":
        name = attributes.get("gen_ai.tool.name")
        call_id = attributes.get("gen_ai.tool.call.id")
        record["tool_calls"] = [{"id": call_id, "name": name, "arguments": None}]
    return record


# -- the route --------------------------------------------------------------------------


def _parse(body: bytes, content_type: str, index: TraceIndex) -> Parsed:
    """The export as span records: CPU work, run off the event loop."""
    return to_records(decode_request(body, content_type), index)


async def _unrecorded(gw: Gateway, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose span the store does not hold yet (an exporter's retry of an export
    already taken holds nothing new)."""
    if not records:
        return records
    try:
        stored = await gw.reader.run(recorded_span_ids, [r["span_id"] for r in records])
    except Exception as exc:
        # The writer keeps spans safe while the store is away; only the recent ids dedupe then.
        log.warning("could not look up ingested span ids in the store: %s", exc)
        return records
    return [r for r in records if r["span_id"] not in stored]


async def _placed_by_the_store(gw: Gateway, parsed: Parsed) -> None:
    """Spans of traces this process has seen no call of find their rollout in the store:
    the call may have gone through another replica, or this process before a restart."""
    if not parsed.unplaced:
        return
    try:
        found = await gw.reader.run(rollouts_of_traces, list(parsed.unplaced))
    except Exception as exc:
        # Nothing of the export is taken yet: an OTLP exporter sends it again after a 503.
        log.warning("could not look up ingested spans' traces in the store: %s", exc)
        raise ServiceUnavailable(
            "the store could not be read to find the rollout of spans that name none; "
            "send the export again"
        ) from exc
    parsed.place(found)


async def _publish(gw: Gateway, index: TraceIndex, records: list[dict[str, Any]]) -> int:
    """Number each rollout's spans in start order, after what the rollout already has; spans
    this process took lately are skipped before they get a number. Returns how many went."""
    # Checked and noted with no await between, so a retry arriving meanwhile skips them too.
    fresh = [r for r in records if index.first_time(r["span_id"])]
    fresh.sort(key=lambda r: (r["rollout_id"], r["start_ns"]))
    by_rollout: dict[str, list[dict[str, Any]]] = {}
    for record in fresh:
        by_rollout.setdefault(record["rollout_id"], []).append(record)
    published = 0
    for rollout_id, group in by_rollout.items():
        for record in group:
            record["attempt_id"] = await gw.sequencer.attempt_of(rollout_id, record["attempt_id"])
        first = await gw.sequencer.reserve(rollout_id, len(group))
        for seq, record in enumerate(group, start=first):
            record["seq"] = seq
            index.note(record["trace_id"], rollout_id, record["attempt_id"])
            gw.recorder.publish(record)
            published += 1
            if published % PUBLISH_BATCH == 0:
                # Awaits that find their answer ready never suspend: give other requests a turn.
                await asyncio.sleep(0)
    return published


async def ingest_traces(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    settings = gw.settings.otlp
    if not settings.ingest:
        raise InvalidRequest("OTLP ingest is off (otlp.ingest: false)", code="ingest_disabled")
    content_type = request.content_type or PROTOBUF
    if content_type not in (PROTOBUF, JSON):
        raise UnsupportedMediaType(f"use {PROTOBUF} or {JSON}, not {content_type}")
    # aiohttp undoes gzip as the body streams in, so the limit bounds the inflated size too.
    body = await _read_limited(request, settings.ingest_max_bytes)
    index = request.app[TRACE_INDEX]
    # Decoding and mapping a large export takes seconds of CPU. On a thread the event loop
    # still gets its turns (the GIL changes hands every few milliseconds), so health probes
    # and proxied calls keep being answered meanwhile.
    loop = asyncio.get_running_loop()
    parsed = await loop.run_in_executor(None, _parse, body, content_type, index)
    await _placed_by_the_store(gw, parsed)
    published = await _publish(gw, index, await _unrecorded(gw, parsed.records))
    index.stats.accepted += published
    index.stats.rejected += parsed.rejected
    answer = ExportTraceServiceResponse()
    if parsed.rejected:
        answer.partial_success.CopyFrom(
            ExportTracePartialSuccess(
                rejected_spans=parsed.rejected, error_message="; ".join(parsed.reasons)
            )
        )
    if content_type == JSON:
        payload = json_format.MessageToDict(answer)
        return web.Response(body=orjson.dumps(payload), content_type=JSON)
    return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)


def add_routes(app: web.Application) -> None:
    app[TRACE_INDEX] = TraceIndex()
    app.router.add_post("/v1/traces", ingest_traces)
