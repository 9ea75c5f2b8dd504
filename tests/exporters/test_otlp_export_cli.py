"""`spangate export --format otlp`: stored rollouts as OTLP/JSON a tracing backend can import."""

from __future__ import annotations

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
