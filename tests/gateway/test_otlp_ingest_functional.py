"""`POST /v1/traces`: an agent instrumented with the real OpenTelemetry SDK sends its spans to
the gateway, and they join their rollout; the endpoint answers as the OTLP spec says."""

from __future__ import annotations

import gzip
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


def _otlp_json(rollout_id: str | None, span_ids: list[str]) -> dict[str, Any]:
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
                                "traceId": "5b8efff798038103d269b633813fc60c",
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
