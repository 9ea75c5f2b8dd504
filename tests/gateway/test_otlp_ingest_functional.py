"""`POST /v1/traces`: an agent instrumented with the real OpenTelemetry SDK sends its spans to
the gateway, and they join their rollout; the endpoint answers as the OTLP spec says."""

from __future__ import annotations

import base64
import gzip
import os
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from servers import GatewayThread, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def agent_tracer() -> Iterator[Callable[[str, dict[str, Any]], Any]]:
    providers: list[TracerProvider] = []

    def make(endpoint: str, resource: dict[str, Any]) -> Any:
        provider = TracerProvider(resource=Resource.create({"service.name": "agent", **resource}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        providers.append(provider)
        return provider.get_tracer("my-agent")

    yield make
    for provider in providers:
        provider.shutdown()


def rollout(gateway: GatewayThread, rollout_id: str) -> dict[str, Any]:
    gateway.flush()
    response = httpx.get(f"{gateway.base}/api/rollouts/{rollout_id}")
    response.raise_for_status()
    return response.json()


def all_spans(detail: dict[str, Any]) -> list[dict[str, Any]]:
    spans = list(detail["unattempted_spans"])
    for attempt in detail["attempts"]:
        spans.extend(attempt["spans"])
    return sorted(spans, key=lambda s: s["seq"])


def test_agent_spans_with_rollout_id_join_the_rollout(
    gateway: GatewayThread, agent_tracer: Callable[..., Any]
) -> None:
    tracer = agent_tracer(f"{gateway.base}/v1/traces", {"rollout.id": "ag-1"})
    with tracer.start_as_current_span("agent turn", kind=SpanKind.INTERNAL) as turn:
        with openai.OpenAI(base_url=gateway.url("ag-1", "1"), api_key="k", max_retries=0) as c:
            c.chat.completions.create(model="gpt-test", messages=MESSAGES)
        with tracer.start_as_current_span(
            "execute_tool search",
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "search",
                "gen_ai.tool.call.id": "call-9",
            },
        ):
            pass
    expected_trace = format_trace_id(turn.get_span_context().trace_id)

    spans = wait_until(
        lambda: (
            len(all_spans(rollout(gateway, "ag-1"))) == 3 and all_spans(rollout(gateway, "ag-1"))
        ),
        what="the agent's spans in the rollout",
    )
    by_name = {s["name"]: s for s in spans}
    agent = by_name["agent turn"]
    assert agent["trace_id"] == expected_trace
    assert agent["span_id"] == format_span_id(turn.get_span_context().span_id)
    assert agent["attempt_id"] == "1"
    assert agent["attributes"]["spangate.span.kind"] == "internal"
    assert agent["attributes"]["service.name"] == "agent"
    tool = by_name["execute_tool search"]
    assert tool["operation"] == "execute_tool"
    assert tool["parent_span_id"] == agent["span_id"]
    assert tool["tool_calls"][0]["name"] == "search"
    assert [s["seq"] for s in spans] == [1, 2, 3]
    assert by_name["chat gpt-test"]["seq"] == 1


def test_a_span_without_rollout_joins_through_a_gateway_call_in_its_trace(
    gateway: GatewayThread, agent_tracer: Callable[..., Any]
) -> None:
    tracer = agent_tracer(f"{gateway.base}/v1/traces", {})
    with tracer.start_as_current_span("plan") as plan:
        context = plan.get_span_context()
        traceparent = f"00-{format_trace_id(context.trace_id)}-{format_span_id(context.span_id)}-01"
        with openai.OpenAI(base_url=gateway.url("ag-2", "x"), api_key="k", max_retries=0) as c:
            c.chat.completions.create(
                model="gpt-test", messages=MESSAGES, extra_headers={"traceparent": traceparent}
            )

    spans = wait_until(
        lambda: (
            len(all_spans(rollout(gateway, "ag-2"))) == 2 and all_spans(rollout(gateway, "ag-2"))
        ),
        what="the plan span in the rollout",
    )
    plan_row, call = sorted(spans, key=lambda s: s["name"] != "plan")
    assert plan_row["attempt_id"] == "x"
    assert call["parent_span_id"] == plan_row["span_id"]


def test_a_span_without_rollout_finds_a_call_of_its_trace_that_another_process_took(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    # The call went through a gateway since restarted (or another replica on the store);
    # the agent's exporter sends its spans seconds later, to the one serving now.
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    first = make_gateway()
    with openai.OpenAI(base_url=first.url("ag-r", "x"), api_key="k", max_retries=0) as c:
        c.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
    first.stop()
    second = make_gateway()

    joined = httpx.post(f"{second.base}/v1/traces", json=_otlp_json(None, [parent], trace_id))
    stranger = httpx.post(f"{second.base}/v1/traces", json=_otlp_json(None, ["aaa91f3b8ff4e0b1"]))

    assert (joined.status_code, joined.json()) == (200, {})
    assert stranger.json()["partialSuccess"]["rejectedSpans"] == "1"
    call, step = all_spans(rollout(second, "ag-r"))
    assert (step["span_id"], step["attempt_id"], step["seq"]) == (parent, "x", 2)
    assert call["parent_span_id"] == step["span_id"]


def _otlp_json(
    rollout_id: str | None, span_ids: list[str], trace_id: str = "5b8efff798038103d269b633813fc60c"
) -> dict[str, Any]:
    attributes = [{"key": "rollout.id", "value": {"stringValue": rollout_id}}] if rollout_id else []
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": attributes},
                "scopeSpans": [
                    {
                        "scope": {"name": "hand"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": "step",
                                "kind": 1,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000001000000000",
                                "status": {"code": 2, "message": "boom"},
                            }
                            for span_id in span_ids
                        ],
                    }
                ],
            }
        ]
    }


def test_gzipped_json_is_taken_and_answered_in_json(gateway: GatewayThread) -> None:
    body = gzip.compress(orjson.dumps(_otlp_json("ag-3", ["eee91f3b8ff4e0b1"])))
    response = httpx.post(
        f"{gateway.base}/v1/traces",
        content=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {}
    (span,) = all_spans(rollout(gateway, "ag-3"))
    assert span["status"] == "error" and span["error_message"] == "boom"
    assert span["duration_ms"] == 1000


def test_spans_that_find_no_rollout_are_a_partial_success(gateway: GatewayThread) -> None:
    good = _otlp_json("ag-4", ["aaa91f3b8ff4e0b1"])
    lost = _otlp_json(None, ["bbb91f3b8ff4e0b1", "ccc91f3b8ff4e0b1"])
    lost["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "1" * 32
    lost["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["traceId"] = "1" * 32
    body = {"resourceSpans": good["resourceSpans"] + lost["resourceSpans"]}
    response = httpx.post(f"{gateway.base}/v1/traces", json=body)
    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "2"
    assert "no rollout" in partial["errorMessage"]
    assert len(all_spans(rollout(gateway, "ag-4"))) == 1
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert "spangate_otlp_spans_ingest_rejected 2.0" in metrics


def test_protobuf_partial_success_is_protobuf(gateway: GatewayThread) -> None:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    message = ExportTraceServiceRequest()
    data = _otlp_json(None, ["ddd91f3b8ff4e0b1"])
    data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "W47/95gDgQPSabYzgT/GDA=="
    data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "3ekfO4/04LE="
    json_format.ParseDict(data, message)
    response = httpx.post(
        f"{gateway.base}/v1/traces",
        content=message.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert response.status_code == 200
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_spans == 1


def test_garbage_is_a_400_and_an_oversized_body_a_413(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(otlp={"ingest_max_bytes": 1000})
    url = f"{gateway.base}/v1/traces"
    garbage = httpx.post(
        url, content=b"\xff\x00 not protobuf", headers={"Content-Type": "application/x-protobuf"}
    )
    assert garbage.status_code == 400
    assert garbage.json()["error"]["type"] == "invalid_request_error"
    assert (
        httpx.post(url, content=b"{nope", headers={"Content-Type": "application/json"}).status_code
        == 400
    )
    big = httpx.post(url, content=b"x" * 5000, headers={"Content-Type": "application/x-protobuf"})
    assert big.status_code == 413
    bomb = gzip.compress(b"\x00" * 100_000)
    inflated = httpx.post(
        url,
        content=bomb,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
    )
    assert inflated.status_code == 413
    assert httpx.post(url, content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


def test_ingest_needs_the_proxy_scope(make_gateway: Callable[..., GatewayThread]) -> None:
    gateway = make_gateway(
        auth={
            "keys": [
                {"key": "reader-key-1", "scopes": ["read"]},
                {"key": "agent-key-1", "scopes": ["proxy"]},
            ]
        }
    )
    url = f"{gateway.base}/v1/traces"
    body = orjson.dumps(_otlp_json("ag-5", ["fff91f3b8ff4e0b1"]))
    headers = {"Content-Type": "application/json"}
    assert httpx.post(url, content=body, headers=headers).status_code == 401
    denied = httpx.post(
        url, content=body, headers={**headers, "Authorization": "Bearer reader-key-1"}
    )
    assert denied.status_code == 403
    allowed = httpx.post(
        url, content=body, headers={**headers, "Authorization": "Bearer agent-key-1"}
    )
    assert allowed.status_code == 200


TRACE = "5b8efff798038103d269b633813fc60c"


def _span(span_id: str, *, trace_id: str = TRACE, name: str = "step", **extra: Any) -> dict:
    return {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": 1,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
        **extra,
    }


def _export(rollout_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    attributes = [{"key": "rollout.id", "value": {"stringValue": rollout_id}}]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": attributes},
                "scopeSpans": [{"scope": {"name": "agent"}, "spans": spans}],
            }
        ]
    }


def _agent_spans(rollout_id: str, count: int) -> dict[str, Any]:
    """What an instrumented agent sends: its own internal spans (plan, turn...)."""
    return _export(
        rollout_id,
        [_span(f"{i + 1:016x}", trace_id=f"{i + 1:032x}", name=f"plan {i}") for i in range(count)],
    )


def _post_json(gateway: GatewayThread, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        f"{gateway.base}/v1/traces",
        content=content,
        headers={"Content-Type": "application/json", **headers},
    )


def _protobuf(data: dict[str, Any]) -> bytes:
    """An OTLP/JSON export as protobuf (whose JSON mapping has the ids in base64)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    for span in data["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        for key in ("traceId", "spanId"):
            span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json_format.ParseDict(data, ExportTraceServiceRequest()).SerializeToString()


def _chat(gateway: GatewayThread, rollout_id: str, attempt_id: str | None = "1") -> None:
    with openai.OpenAI(
        base_url=gateway.url(rollout_id, attempt_id), api_key="k", max_retries=0
    ) as client:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)


def test_a_malformed_json_id_rejects_that_span_only(gateway: GatewayThread) -> None:
    body = _export("ag-6", [_span("aaa91f3b8ff4e0b1"), _span("not-hex-at-all!!")])
    response = _post_json(gateway, body)
    assert response.status_code == 200, response.text
    assert response.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert [s["span_id"] for s in gateway.spans(rollout_id="ag-6")] == ["aaa91f3b8ff4e0b1"]


def test_a_malformed_protobuf_id_rejects_that_span_only(gateway: GatewayThread) -> None:
    body = _protobuf(_export("ag-7", [_span("eee91f3b8ff4e0b1"), _span("abcdef")]))
    response = httpx.post(
        f"{gateway.base}/v1/traces",
        content=body,
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert response.status_code == 200
    assert (
        ExportTraceServiceResponse.FromString(response.content).partial_success.rejected_spans == 1
    )
    assert len(gateway.spans(rollout_id="ag-7")) == 1


def test_all_zero_ids_are_malformed(gateway: GatewayThread) -> None:
    body = _export(
        "ag-8",
        [
            _span("0000000000000000"),
            _span("aaa91f3b8ff4e0b2", trace_id="0" * 32),
            _span("aaa91f3b8ff4e0b3", parentSpanId="0000000000000000"),
        ],
    )
    response = _post_json(gateway, body)
    assert response.status_code == 200
    assert response.json()["partialSuccess"]["rejectedSpans"] == "2"
    # An all-zero parent is taken for none, as some exporters write it for a root.
    (root,) = gateway.spans(rollout_id="ag-8")
    assert root["span_id"] == "aaa91f3b8ff4e0b3" and root["parent_span_id"] is None


@pytest.mark.parametrize("body", [b'"x"', b"[]", b'"resourceSpans"'])
def test_json_that_is_not_an_object_is_a_400(gateway: GatewayThread, body: bytes) -> None:
    response = _post_json(gateway, body)
    assert response.status_code == 400, response.text


def test_a_body_not_encoded_as_declared_is_a_400(gateway: GatewayThread) -> None:
    corrupt = _post_json(
        gateway,
        b"\x1f\x8b\x08\x00 definitely not deflate data" * 10,
        **{"Content-Encoding": "gzip"},
    )
    assert corrupt.status_code == 400
    assert corrupt.json()["error"]["type"] == "invalid_request_error"
    whole = gzip.compress(orjson.dumps(_export("ag-9", [_span("ccc91f3b8ff4e0b1")])) * 50)
    truncated = _post_json(gateway, whole[: len(whole) // 2], **{"Content-Encoding": "gzip"})
    assert truncated.status_code == 400
    assert gateway.spans(rollout_id="ag-9") == []


def test_a_deflate_body_is_taken(gateway: GatewayThread) -> None:
    raw = zlib.compress(orjson.dumps(_export("ag-10", [_span("ddd91f3b8ff4e0b1")])))
    response = _post_json(gateway, raw, **{"Content-Encoding": "deflate"})
    assert response.status_code == 200
    assert len(gateway.spans(rollout_id="ag-10")) == 1


def test_a_chunked_body_over_the_limit_is_a_413(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(otlp={"ingest_max_bytes": 10_000})
    response = httpx.post(
        f"{gateway.base}/v1/traces",
        content=(b"x" * 1000 for _ in range(50)),
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert response.status_code == 413


def test_odd_requests_are_never_a_500(gateway: GatewayThread) -> None:
    head = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for raw in [
        head + b"Content-Encoding: br\r\nContent-Length: 5\r\n\r\nhello",
        head + b"Content-Encoding: zstd\r\nContent-Length: 5\r\n\r\nhello",
        head + b"Content-Length: 2\r\n\r\n\xff\xfe",
    ]:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(raw)
            status_line = sock.recv(65536).split(b"\r\n", 1)[0]
        assert not status_line.startswith(b"HTTP/1.1 5"), (raw[-40:], status_line)


def test_end_before_start_and_odd_attribute_values_are_stored(gateway: GatewayThread) -> None:
    odd = _span(
        "fff91f3b8ff4e0b1",
        endTimeUnixNano="1600000000000000000",
        attributes=[
            {
                "key": "nested",
                "value": {
                    "kvlistValue": {
                        "values": [{"key": "a", "value": {"intValue": "9223372036854775807"}}]
                    }
                },
            },
            {"key": "blob", "value": {"bytesValue": "AAEC"}},
            {
                "key": "list",
                "value": {"arrayValue": {"values": [{"stringValue": "x"}, {"doubleValue": 1.5}]}},
            },
            {"key": "empty", "value": {}},
        ],
    )
    response = _post_json(gateway, _export("ag-11", [odd]))
    assert response.status_code == 200, response.text
    (row,) = gateway.spans(rollout_id="ag-11")
    assert row["end_ns"] >= row["start_ns"]
    assert row["attributes"]["nested"] == {"a": 9223372036854775807}


def test_an_agent_span_cannot_set_the_gateways_own_attributes(gateway: GatewayThread) -> None:
    """They are kept under `agent.`: the dashboard, the metrics and the call counts read the
    gateway's `spangate.*` attributes."""
    own = _span(
        "aaa91f3b8ff4e0b4",
        attributes=[
            {"key": "spangate.tries", "value": {"stringValue": "many"}},
            {"key": "spangate.source", "value": {"stringValue": "gateway"}},
        ],
    )
    assert _post_json(gateway, _export("ag-12", [own])).status_code == 200
    (row,) = gateway.spans(rollout_id="ag-12")
    attributes = row["attributes"]
    assert attributes["spangate.source"] == "otlp"
    assert "spangate.tries" not in attributes
    assert attributes["agent.spangate.tries"] == "many"
    assert attributes["agent.spangate.source"] == "gateway"


def test_an_export_sent_again_is_stored_once_with_no_gap_in_seq(gateway: GatewayThread) -> None:
    """An OTLP exporter re-sends an export whose answer it did not get."""
    body = _export("ag-13", [_span("bbb91f3b8ff4e0b1")])
    assert _post_json(gateway, body).status_code == 200
    assert _post_json(gateway, body).status_code == 200
    _chat(gateway, "ag-13", None)
    assert [s["seq"] for s in gateway.spans(rollout_id="ag-13")] == [1, 2]
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert "spangate_otlp_spans_ingested 1.0" in metrics


def test_an_export_sent_again_after_a_restart_is_stored_once(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    """The gateway that took it no longer remembers it: the store says it has the spans."""
    body = _export("ag-14", [_span("bbb91f3b8ff4e0b2"), _span("bbb91f3b8ff4e0b3")])
    first = make_gateway()
    assert _post_json(first, body).status_code == 200
    first.flush()
    first.stop()
    second = make_gateway()
    assert _post_json(second, body).status_code == 200
    _chat(second, "ag-14", None)
    assert [s["seq"] for s in second.spans(rollout_id="ag-14")] == [1, 2, 3]


@pytest.mark.both_backends
def test_agent_spans_are_not_counted_as_model_calls(gateway: GatewayThread) -> None:
    """One call through the gateway and three of the agent's own spans: one call, in the
    rollout's summary and in the stats."""
    _chat(gateway, "ag-15")
    assert _post_json(gateway, _agent_spans("ag-15", 3)).status_code == 200
    detail = rollout(gateway, "ag-15")
    assert len(all_spans(detail)) == 4
    assert detail["summary"]["calls"] == 1, detail["summary"]
    stats = httpx.get(f"{gateway.base}/api/stats").json()
    assert stats["totals"]["calls"] == 1, stats


@pytest.mark.both_backends
def test_agent_spans_do_not_use_up_a_max_calls_budget_after_a_restart(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    """Budget counters start from what the store recorded: the agent's spans are no calls."""
    budgets = {"budgets": {"rollout": {"max_calls": 3}}}
    first = make_gateway(**budgets)
    _chat(first, "ag-16")
    assert _post_json(first, _agent_spans("ag-16", 3)).status_code == 200
    first.flush()
    first.stop()
    second = make_gateway(**budgets)
    _chat(second, "ag-16")
    _chat(second, "ag-16")
    with pytest.raises(openai.APIStatusError) as refused:
        _chat(second, "ag-16")
    assert refused.value.status_code == 402


def test_a_large_ingest_does_not_stall_other_requests(gateway: GatewayThread) -> None:
    """A 5 MB export (100,000 small spans, under the default limit) takes seconds to decode,
    map and publish; health probes sent one after another meanwhile keep being answered
    (counted, not timed: a stalled gateway answers a handful)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    message = ExportTraceServiceRequest()
    resource_spans = message.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="rollout.id", value=AnyValue(string_value="ag-17"))
    )
    spans = resource_spans.scope_spans.add().spans
    for _ in range(100_000):
        span = spans.add()
        span.trace_id, span.span_id, span.name = os.urandom(16), os.urandom(8), "x"
        span.start_time_unix_nano, span.end_time_unix_nano = 1, 2
    body = message.SerializeToString()
    done = threading.Event()
    status: list[int] = []

    def ingest() -> None:
        response = httpx.post(
            f"{gateway.base}/v1/traces",
            content=body,
            headers={"Content-Type": "application/x-protobuf"},
            timeout=120,
        )
        status.append(response.status_code)
        done.set()

    worker = threading.Thread(target=ingest)
    worker.start()
    answered = 0
    with httpx.Client(timeout=120) as client:
        while not done.is_set():
            client.get(f"{gateway.base}/health/live").raise_for_status()
            answered += 1
    worker.join()
    assert status == [200]
    assert answered >= 100, f"only {answered} health probes answered during the ingest"
