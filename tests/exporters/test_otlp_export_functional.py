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
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from otlp_receiver import OtlpReceiver, Received, attributes_of
from servers import GatewayThread, read_spans, wait_until

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


def metric(gateway: GatewayThread, name: str) -> float:
    for line in httpx.get(f"{gateway.base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class PartialReceiver(OtlpReceiver):
    """Keeps what it is sent but answers 200 with `partial_success` refusing every span of
    the request, as Jaeger and Tempo do for spans they will not take."""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.state.requests.append(dict(request.headers))
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        count = 0
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    count += 1
                    self.state.spans.append(Received(span, {}, scope_spans.scope.name))
        answer = ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(
                rejected_spans=count, error_message="span too old"
            )
        )
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")


def test_spans_a_200_refuses_in_partial_success_count_as_failed(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    partial = PartialReceiver().start()
    try:
        gateway = make_gateway(otlp=otlp(partial.url, compression="none"))
        for _ in range(3):
            chat(gateway.url("ps-1", "1"))
        exporter = gateway.app[_exporter_key()]
        wait_until(lambda: exporter.stats.exported + exporter.stats.failed >= 3, what="counted")
        assert metric(gateway, "spangate_otlp_spans_failed") == 3
        assert metric(gateway, "spangate_otlp_spans_exported") == 0
    finally:
        partial.stop()


def _restart(
    make_gateway: Callable[..., GatewayThread], first: GatewayThread, **overrides: Any
) -> GatewayThread:
    first.stop()
    return make_gateway(**overrides)


def _marker_sent(gateway: GatewayThread, receiver: OtlpReceiver) -> None:
    """The export queue is first in, first out: once a later call's span is out, everything
    before it was handled."""
    raw, _ = chat(gateway.url("marker", "1"))
    marker = raw.headers["X-Span-Id"]
    wait_until(lambda: marker in receiver.state.by_id(), what="the marker span")


def test_a_rollout_reward_given_before_a_restart_is_on_the_root_span(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    first = make_gateway(otlp=otlp(receiver.url))
    chat(first.url("rs-1", "1"))
    httpx.post(
        f"{first.base}/api/rewards", json={"rollout_id": "rs-1", "value": 0.9, "name": "score"}
    ).raise_for_status()
    second = _restart(make_gateway, first, otlp=otlp(receiver.url))
    httpx.patch(f"{second.base}/api/rollouts/rs-1", json={"status": "succeeded"}).raise_for_status()
    (root,) = wait_until(lambda: receiver.state.named("invoke_agent rs-1"), what="the root span")
    (event,) = root.span.events
    assert attributes_of(event.attributes)["gen_ai.evaluation.name"] == "score"
    assert not receiver.state.named("evaluation score")


def test_a_late_reward_after_a_restart_is_an_evaluation_span_under_the_root(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    first = make_gateway(otlp=otlp(receiver.url))
    chat(first.url("rs-2", "1"))
    httpx.patch(f"{first.base}/api/rollouts/rs-2", json={"status": "succeeded"}).raise_for_status()
    wait_until(lambda: receiver.state.named("invoke_agent rs-2"), what="the root span")
    second = _restart(make_gateway, first, otlp=otlp(receiver.url))
    httpx.post(
        f"{second.base}/api/rewards", json={"rollout_id": "rs-2", "value": 1.0, "name": "late"}
    ).raise_for_status()
    (late,) = wait_until(lambda: receiver.state.named("evaluation late"), what="the reward")
    assert (late.trace_id, late.parent_id) == derived("rs-2")


def test_changing_a_finished_rollout_never_sends_its_root_again(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    first = make_gateway(otlp=otlp(receiver.url))
    chat(first.url("rs-3", "1"))
    httpx.patch(f"{first.base}/api/rollouts/rs-3", json={"status": "succeeded"}).raise_for_status()
    httpx.patch(f"{first.base}/api/rollouts/rs-3", json={"tags": ["a"]}).raise_for_status()
    wait_until(lambda: receiver.state.named("invoke_agent rs-3"), what="the root span")
    second = _restart(make_gateway, first, otlp=otlp(receiver.url))
    with httpx.Client(base_url=second.base) as api:
        api.patch("/api/rollouts/rs-3", json={"tags": ["x"]}).raise_for_status()
        api.patch("/api/rollouts/rs-3", json={"status": "succeeded"}).raise_for_status()
    _marker_sent(second, receiver)
    assert len(receiver.state.named("invoke_agent rs-3")) == 1


def test_rollout_rewards_past_what_the_root_carries_go_as_evaluation_spans(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url))
    chat(gateway.url("rs-4", "1"))
    with httpx.Client(base_url=gateway.base) as api:
        for step in range(120):
            api.post(
                "/api/rewards", json={"rollout_id": "rs-4", "value": step / 120, "name": "step"}
            ).raise_for_status()
        api.patch("/api/rollouts/rs-4", json={"status": "succeeded"}).raise_for_status()
    (root,) = wait_until(lambda: receiver.state.named("invoke_agent rs-4"), what="the root span")
    rest = wait_until(
        lambda: (
            len(receiver.state.named("evaluation step")) == 20
            and receiver.state.named("evaluation step")
        ),
        what="the rewards past 100",
    )
    assert len(root.span.events) == 100
    assert {(r.trace_id, r.parent_id) for r in rest} == {derived("rs-4")}
    scores = [
        attributes_of(e.attributes)["gen_ai.evaluation.score.value"]
        for e in [*root.span.events, *(r.span.events[0] for r in rest)]
    ]
    assert sorted(scores) == [step / 120 for step in range(120)]


def test_a_reward_after_a_restart_stays_in_the_callers_trace(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    first = make_gateway(otlp=otlp(receiver.url))
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    raw, _ = chat(
        first.url("rs-5", "1"),
        extra_headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"},
    )
    span_id = raw.headers["X-Span-Id"]
    wait_until(lambda: span_id in receiver.state.by_id(), what="the call span")
    second = _restart(make_gateway, first, otlp=otlp(receiver.url))
    httpx.post(
        f"{second.base}/api/rewards", json={"span_id": span_id, "value": 1, "name": "judged"}
    ).raise_for_status()
    (evaluation,) = wait_until(
        lambda: receiver.state.named("evaluation judged"), what="the evaluation span"
    )
    assert evaluation.parent_id == span_id
    assert evaluation.trace_id == caller_trace


def test_a_long_conversation_stays_parseable_json_in_content_attributes(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url, content=True))
    long_text = "lorem ipsum " * 4000
    messages = [{"role": "user", "content": long_text}, {"role": "user", "content": "and?"}]
    raw, _ = chat(gateway.url("mp-1", "1"), messages=messages)
    span_id = raw.headers["X-Span-Id"]
    span = wait_until(lambda: receiver.state.by_id().get(span_id), what="the span")
    text = span.attributes["gen_ai.input.messages"]
    assert len(text) <= 32_000
    first, last = orjson.loads(text)
    assert first["parts"][0]["content"].startswith("lorem ipsum")
    assert first["parts"][0]["content"].endswith("…")
    assert last["parts"][0]["content"] == "and?"


def test_agent_span_attributes_keep_their_types(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    """True == 1 in Python: a bool attribute must not turn a later int into a bool."""
    gateway = make_gateway(otlp=otlp(receiver.url))

    def agent_span(span_id: str, value: dict[str, Any]) -> dict[str, Any]:
        return {
            "traceId": "7b8efff798038103d269b633813fc60c",
            "spanId": span_id,
            "name": f"step {span_id}",
            "kind": 1,
            "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000001000000000",
            "attributes": [
                {"key": "rollout.id", "value": {"stringValue": "mp-2"}},
                {"key": "agent.flag", "value": value},
            ],
        }

    spans = [
        agent_span("1111111111111111", {"boolValue": True}),
        agent_span("2222222222222222", {"intValue": "1"}),
        agent_span("3333333333333333", {"boolValue": False}),
        agent_span("4444444444444444", {"intValue": "0"}),
    ]
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": []},
                "scopeSpans": [{"scope": {"name": "a"}, "spans": spans}],
            }
        ]
    }
    response = httpx.post(f"{gateway.base}/v1/traces", json=body)
    assert response.status_code == 200, response.text
    wanted = {s["spanId"] for s in spans}
    received = wait_until(
        lambda: wanted <= set(receiver.state.by_id()) and receiver.state.by_id(),
        what="the agent spans",
    )
    kinds = {
        span_id: [
            kv.value.WhichOneof("value")
            for kv in received[span_id].span.attributes
            if kv.key == "agent.flag"
        ]
        for span_id in wanted
    }
    assert kinds == {
        "1111111111111111": ["bool_value"],
        "2222222222222222": ["int_value"],
        "3333333333333333": ["bool_value"],
        "4444444444444444": ["int_value"],
    }


def test_exported_ids_and_times_are_valid(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    gateway = make_gateway(otlp=otlp(receiver.url))
    chat(gateway.url("mp-3", "1"))
    chat(
        gateway.url("mp-3", "1"),
        extra_headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    with httpx.Client(base_url=gateway.base) as api:
        api.post("/api/rewards", json={"rollout_id": "mp-3", "value": 1}).raise_for_status()
        api.patch("/api/rollouts/mp-3", json={"status": "timeout"}).raise_for_status()
        api.post("/api/rewards", json={"rollout_id": "mp-3", "value": 2}).raise_for_status()
    wait_until(lambda: receiver.state.named("evaluation reward"), what="the late reward")
    assert len(receiver.state.spans) == 4
    for received in receiver.state.spans:
        span = received.span
        assert len(span.trace_id) == 16 and any(span.trace_id)
        assert len(span.span_id) == 8 and any(span.span_id)
        assert len(span.parent_span_id) in (0, 8)
        assert span.start_time_unix_nano > 0
        assert span.end_time_unix_nano >= span.start_time_unix_nano


class FlakyReceiver(OtlpReceiver):
    """Drops the connection without an answer on the first `drops` requests."""

    drops = 2

    async def _handle(self, request: web.Request) -> web.Response:
        if self.drops > 0:
            self.drops -= 1
            await request.read()
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError
        return await super()._handle(request)


def test_a_connection_closed_without_an_answer_is_tried_again(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    flaky = FlakyReceiver().start()
    try:
        gateway = make_gateway(otlp=otlp(flaky.url, batch_size=500, flush_interval=0.3))
        ids = {chat(gateway.url("rf-1", "1"))[0].headers["X-Span-Id"] for _ in range(5)}
        wait_until(lambda: ids <= set(flaky.state.by_id()), timeout=15, what="every span")
        assert gateway.app[_exporter_key()].stats.failed == 0
    finally:
        flaky.stop()


def test_shutdown_with_the_receiver_down_ends_and_the_store_is_complete(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    down = receiver.url
    receiver.stop()
    gateway = make_gateway(otlp=otlp(down, shutdown_timeout=1, retry_attempts=50))
    for _ in range(5):
        chat(gateway.url("rd-1", "1"))
    exporter = gateway.app[_exporter_key()]
    gateway.flush()
    gateway.stop()
    assert exporter.stats.exported == 0
    assert exporter.stats.dropped + exporter.stats.failed == 5
    assert len(read_spans(gateway.db_path, rollout_id="rd-1")) == 5


def test_a_receiver_that_never_answers_costs_calls_nothing(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    try:
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces"
        gateway = make_gateway(otlp=otlp(url, timeout=0.3, retry_attempts=2))
        for _ in range(3):
            raw, _ = chat(gateway.url("rh-1", "1"))
            assert raw.status_code == 200
        exporter = gateway.app[_exporter_key()]
        wait_until(lambda: exporter.stats.failed >= 3, timeout=20, what="failures counted")
        assert exporter.stats.exported == 0
        assert len(gateway.spans(rollout_id="rh-1")) == 3
    finally:
        hole.close()


BIG = "x" * 512_000


def _queued_body_bytes(gateway: GatewayThread) -> int:
    held = 0
    for _, item, _ in list(gateway.app[_exporter_key()]._queue):
        for key in ("request_body", "response_body"):
            value = item.get(key)
            if isinstance(value, bytes | bytearray | str):
                held += len(value)
            elif value is not None:
                held += len(orjson.dumps(value))
    return held


def test_without_content_the_export_queue_holds_no_bodies(
    make_gateway: Callable[..., GatewayThread], receiver: OtlpReceiver
) -> None:
    down = receiver.url
    receiver.stop()
    gateway = make_gateway(otlp=otlp(down, retry_attempts=50, flush_interval=60, batch_size=1000))
    for _ in range(10):
        chat(gateway.url("rm-1", "1"), messages=[{"role": "user", "content": BIG}])
    exporter = gateway.app[_exporter_key()]
    wait_until(lambda: exporter.depth >= 10, what="the calls queued")
    assert _queued_body_bytes(gateway) == 0


def test_with_content_the_export_queue_is_bounded_in_bytes_and_counts_the_rest(
    make_gateway: Callable[..., GatewayThread],
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.exporters.otlp.QUEUE_BODY_BYTES", 2_000_000)
    down = receiver.url
    receiver.stop()
    gateway = make_gateway(
        otlp=otlp(down, content=True, retry_attempts=50, flush_interval=60, batch_size=1000)
    )
    for _ in range(10):
        chat(gateway.url("rm-2", "1"), messages=[{"role": "user", "content": BIG}])
    exporter = gateway.app[_exporter_key()]
    wait_until(lambda: exporter.depth + exporter.stats.dropped >= 10, what="every call handled")
    assert 0 < _queued_body_bytes(gateway) <= 2_000_000
    assert exporter.depth + exporter.stats.dropped == 10
    assert exporter.stats.dropped >= 6
