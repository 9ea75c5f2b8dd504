"""The OTLP exporter end to end: the real gateway in front of the fake provider, sending to a
real receiver that decodes with opentelemetry-proto."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from otlp_receiver import OtlpReceiver, attributes_of
from servers import GatewayThread, wait_until

from gateway.exporters.otlp_mapping import EVALUATION_EVENT

CLIENT, INTERNAL = 3, 1
STATUS_ERROR = 2
MESSAGES = [{"role": "user", "content": "hello there"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def otlp(endpoint: str, **overrides: Any) -> dict[str, Any]:
    return {"endpoint": endpoint, "flush_interval": 0.05, "batch_size": 64, **overrides}


def chat(base_url: str, **kwargs: Any) -> Any:
    with openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=kwargs.pop("model", "gpt-test"),
            messages=kwargs.pop("messages", MESSAGES),
            **kwargs,
        )
        return raw, raw.parse()


def derived(rollout_id: str) -> tuple[str, str]:
    digest = hashlib.sha256(b"spangate.rollout:" + rollout_id.encode()).hexdigest()
    return digest[:32], digest[32:48]


def test_calls_are_exported_with_genai_attributes_under_one_rollout_trace(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url))
    raw, _ = chat(gateway.url("r-1", "a-1"), temperature=0.5, max_tokens=40)
    with openai.OpenAI(base_url=gateway.url("r-1", "a-1"), api_key="k", max_retries=0) as client:
        stream = client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        list(stream.parse())

    spans = wait_until(
        lambda: receiver.state.named("chat gpt-test")[1:] and receiver.state.named("chat gpt-test"),
        what="two spans",
    )
    plain, streamed = sorted(spans, key=lambda r: r.attributes["rollout.seq"])
    trace_id, root_id = derived("r-1")
    assert plain.span_id == raw.headers["X-Span-Id"]
    assert plain.trace_id == raw.headers["X-Trace-Id"] == trace_id == streamed.trace_id
    assert streamed.span_id == stream.headers["X-Span-Id"]
    assert plain.parent_id == streamed.parent_id == root_id
    assert plain.span.kind == CLIENT
    (row,) = gateway.spans(span_id=plain.span_id)
    attributes = plain.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-test"
    assert attributes["gen_ai.response.model"] == row["response_model"]
    assert attributes["gen_ai.response.id"] == row["response_id"]
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["gen_ai.usage.input_tokens"] == row["input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] == row["output_tokens"] > 0
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.max_tokens"] == 40
    assert attributes["gen_ai.request.stream"] is False
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] > 0
    assert attributes["rollout.id"] == "r-1"
    assert attributes["rollout.attempt.id"] == "a-1"
    assert attributes["rollout.seq"] == 1
    assert "gen_ai.input.messages" not in attributes
    assert plain.span.start_time_unix_nano == row["start_ns"]
    assert plain.span.end_time_unix_nano == row["end_ns"]
    assert streamed.attributes["gen_ai.request.stream"] is True
    assert streamed.attributes["gen_ai.response.time_to_first_chunk"] > 0
    resource = plain.resource
    assert resource["service.name"] == "spangate"
    assert resource["service.version"]
    assert resource["service.instance.id"]


def test_rewards_become_evaluation_events_and_the_root_span_closes_the_rollout(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url))
    raw, _ = chat(gateway.url("r-2", "1"))
    span_id = raw.headers["X-Span-Id"]
    api = httpx.Client(base_url=gateway.base)
    api.post(
        "/api/rewards",
        json={"rollout_id": "r-2", "value": 0.75, "name": "accuracy", "comment": "close"},
    ).raise_for_status()
    api.post(
        "/api/rewards", json={"span_id": span_id, "value": 1.0, "name": "step"}
    ).raise_for_status()
    api.patch("/api/rollouts/r-2", json={"status": "failed"}).raise_for_status()
    api.post(
        "/api/rewards", json={"rollout_id": "r-2", "value": 0.1, "name": "late"}
    ).raise_for_status()

    trace_id, root_id = derived("r-2")
    (root,) = wait_until(lambda: receiver.state.named("invoke_agent r-2"), what="the root span")
    assert root.trace_id == trace_id and root.span_id == root_id and root.parent_id == ""
    assert root.span.kind == INTERNAL
    assert root.span.status.code == STATUS_ERROR
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["rollout.status"] == "failed"
    (event,) = root.span.events
    assert event.name == EVALUATION_EVENT
    values = attributes_of(event.attributes)
    assert values["gen_ai.evaluation.name"] == "accuracy"
    assert values["gen_ai.evaluation.score.value"] == 0.75
    assert values["gen_ai.evaluation.explanation"] == "close"

    (step,) = wait_until(lambda: receiver.state.named("evaluation step"), what="span reward")
    assert step.parent_id == span_id and step.trace_id == trace_id
    assert attributes_of(step.span.events[0].attributes)["gen_ai.evaluation.score.value"] == 1.0
    (late,) = wait_until(lambda: receiver.state.named("evaluation late"), what="late reward")
    assert late.parent_id == root_id
    api.close()


def test_traceparent_makes_the_call_a_child_of_the_callers_span(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url))
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    raw, _ = chat(
        gateway.url("r-3", "1"), extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"}
    )
    (span,) = wait_until(lambda: receiver.state.named("chat gpt-test"), what="the span")
    assert span.trace_id == trace_id == raw.headers["X-Trace-Id"]
    assert span.parent_id == parent


def test_errors_and_derived_tool_executions_are_exported(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver, fake_provider: Any
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url, content=True))
    url = gateway.url("r-4", "1")
    _, reply = chat(url, tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    history = [
        *MESSAGES,
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    chat(url, messages=history, tools=TOOLS)
    fake_provider.state.add_fault(
        status=400, message="bad things", error_type="invalid_request_error"
    )
    with pytest.raises(openai.BadRequestError):
        chat(url)

    (tool,) = wait_until(lambda: receiver.state.named("execute_tool lookup"), what="tool span")
    assert tool.span.kind == INTERNAL
    assert tool.attributes["gen_ai.tool.name"] == "lookup"
    assert tool.attributes["gen_ai.tool.call.id"] == call.id
    assert tool.attributes["gen_ai.tool.call.result"] == "42"
    assert tool.attributes["gen_ai.tool.call.arguments"] == call.function.arguments
    spans = wait_until(
        lambda: (
            len(receiver.state.named("chat gpt-test")) == 3
            and receiver.state.named("chat gpt-test")
        ),
        what="3 calls",
    )
    first = min(spans, key=lambda r: r.attributes["rollout.seq"])
    assert tool.parent_id == first.span_id
    assert "lookup" in first.attributes["gen_ai.output.messages"]
    assert "hello there" in first.attributes["gen_ai.input.messages"]
    # The GenAI conventions' shape (what Phoenix and other backends parse): role + parts.
    inputs = orjson.loads(first.attributes["gen_ai.input.messages"])
    assert inputs[-1]["role"] == "user"
    assert inputs[-1]["parts"][0] == {"type": "text", "content": "hello there"}
    (answer,) = orjson.loads(first.attributes["gen_ai.output.messages"])
    (asked,) = [p for p in answer["parts"] if p["type"] == "tool_call"]
    assert asked["name"] == "lookup" and asked["id"] == call.id
    failed = max(spans, key=lambda r: r.attributes["rollout.seq"])
    assert failed.span.status.code == STATUS_ERROR
    assert failed.span.status.message == "bad things"
    assert failed.attributes["error.type"] == "invalid_request_error"


def test_json_protocol_is_decodable_too(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url, protocol="http/json", compression="none"))
    raw, _ = chat(gateway.url("r-5", "1"))
    (span,) = wait_until(lambda: receiver.state.named("chat gpt-test"), what="the span")
    assert span.span_id == raw.headers["X-Span-Id"]
    assert receiver.state.requests[0]["Content-Type"] == "application/json"


def test_receiver_503_then_200_loses_nothing(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    receiver.state.answers.extend([503, 429])
    receiver.state.retry_after = "0"
    gateway = make_gateway(otlp=otlp(receiver.url, batch_size=500, flush_interval=0.3))
    ids = {chat(gateway.url("r-6", "1"))[0].headers["X-Span-Id"] for _ in range(10)}
    wait_until(lambda: ids <= set(receiver.state.by_id()), timeout=10, what="every span")
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert "spangate_otlp_export_retries 2.0" in metrics
    assert "spangate_otlp_spans_failed 0.0" in metrics


def test_a_400_is_not_retried(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    receiver.state.answers.append(400)
    gateway = make_gateway(otlp=otlp(receiver.url))
    chat(gateway.url("r-7", "1"))
    exporter = gateway.app[_exporter_key()]
    wait_until(lambda: exporter.stats.failed == 1, what="the batch counted as failed")
    assert len(receiver.state.requests) == 1
    assert exporter.stats.retries == 0


def _exporter_key() -> Any:
    from gateway.compose import OTLP_EXPORTER

    return OTLP_EXPORTER


def test_receiver_down_never_fails_or_slows_calls_and_the_store_is_complete(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    down = receiver.url
    receiver.stop()
    gateway = make_gateway(otlp=otlp(down, queue_size=5, timeout=1.0))
    started = time.perf_counter()
    for _ in range(30):
        raw, _ = chat(gateway.url("r-8", "1"))
        assert raw.status_code == 200
    elapsed = time.perf_counter() - started
    assert len(gateway.spans(rollout_id="r-8")) == 30
    exporter = gateway.app[_exporter_key()]
    assert exporter.stats.dropped > 0
    assert exporter.stats.exported == 0
    # 30 calls to a local fake provider: well under the exporter's retry backoff.
    assert elapsed < 10
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert f"spangate_otlp_spans_dropped {float(exporter.stats.dropped)}" in metrics
