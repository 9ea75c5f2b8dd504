"""`spangate export --format otlp`: stored rollouts as OTLP/JSON a tracing backend can import."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
from click.testing import CliRunner
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_receiver import _hex_to_b64, attributes_of
from servers import GatewayThread

from gateway.cli import cli


def test_export_format_otlp_writes_one_trace_export_per_rollout(gateway: GatewayThread) -> None:
    with openai.OpenAI(base_url=gateway.url("ex-1", "1"), api_key="k", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    span_id = raw.headers["X-Span-Id"]
    api = httpx.Client(base_url=gateway.base)
    api.post("/api/rewards", json={"span_id": span_id, "value": 0.5}).raise_for_status()
    api.post(
        "/api/rewards", json={"rollout_id": "ex-1", "value": 1, "final": True}
    ).raise_for_status()
    api.patch("/api/rollouts/ex-1", json={"status": "succeeded"}).raise_for_status()
    api.close()
    gateway.flush()

    result = CliRunner().invoke(
        cli, ["export", "--format", "otlp", "--db", str(gateway.db_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    message = ExportTraceServiceRequest()
    json_format.ParseDict(_hex_to_b64(orjson.loads(line)), message)
    spans = {s.name: s for s in message.resource_spans[0].scope_spans[0].spans}
    call, root = spans["chat gpt-test"], spans["invoke_agent ex-1"]
    assert call.span_id.hex() == span_id
    assert call.trace_id.hex() == raw.headers["X-Trace-Id"] == root.trace_id.hex()
    assert call.parent_span_id == root.span_id
    assert attributes_of(call.attributes)["gen_ai.usage.input_tokens"] > 0
    assert attributes_of(call.events[0].attributes)["gen_ai.evaluation.score.value"] == 0.5
    assert attributes_of(root.events[0].attributes)["reward.final"] is True


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


def test_export_format_otlp_has_every_span_and_each_reward_on_its_span(
    gateway: GatewayThread,
) -> None:
    """A tool round trip, an agent's own span and a reward on each: offline, every reward is
    an event on the span it targets."""
    url = gateway.url("cx-1", "1")
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as client:
        first = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=TOOLS
        )
        call = first.choices[0].message.tool_calls[0]
        client.chat.completions.create(
            model="gpt-test",
            tools=TOOLS,
            messages=[
                {"role": "user", "content": "hi"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "42"},
            ],
        )
    agent = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "rollout.id", "value": {"stringValue": "cx-1"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "agent"},
                        "spans": [
                            {
                                "traceId": "9b8efff798038103d269b633813fc60c",
                                "spanId": "9aa91f3b8ff4e0b1",
                                "name": "plan",
                                "kind": 1,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000001000000000",
                            }
                        ],
                    }
                ],
            }
        ]
    }
    assert httpx.post(f"{gateway.base}/v1/traces", json=agent).status_code == 200
    gateway.flush()
    rows = gateway.spans(rollout_id="cx-1")
    tool_row = next(r for r in rows if r["operation"] == "execute_tool")
    with httpx.Client(base_url=gateway.base) as api:
        api.post(
            "/api/rewards", json={"span_id": tool_row["span_id"], "value": 0.3, "name": "tool_ok"}
        ).raise_for_status()
        api.post(
            "/api/rewards", json={"span_id": "9aa91f3b8ff4e0b1", "value": 0.7, "name": "plan_ok"}
        ).raise_for_status()
        api.patch("/api/rollouts/cx-1", json={"status": "succeeded"}).raise_for_status()
    gateway.flush()

    result = CliRunner().invoke(
        cli, ["export", "--format", "otlp", "--db", str(gateway.db_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    message = ExportTraceServiceRequest()
    json_format.ParseDict(_hex_to_b64(orjson.loads(line)), message)
    spans = list(message.resource_spans[0].scope_spans[0].spans)
    ids = {s.span_id.hex() for s in spans}
    assert {r["span_id"] for r in rows} <= ids, "a stored span of the rollout is missing"
    events: dict[str, list[Any]] = {
        s.span_id.hex(): [attributes_of(e.attributes)["gen_ai.evaluation.name"] for e in s.events]
        for s in spans
    }
    assert events[tool_row["span_id"]] == ["tool_ok"]
    assert events["9aa91f3b8ff4e0b1"] == ["plan_ok"]
    for s in spans:
        assert len(s.trace_id) == 16 and len(s.span_id) == 8
        assert s.end_time_unix_nano >= s.start_time_unix_nano
