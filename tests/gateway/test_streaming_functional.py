"""Streams through the gateway: byte-faithful, unbuffered, usage hidden unless asked for.

The raw server-sent events a client reads through the gateway must be the bytes the upstream
would have sent it directly (ids and timestamps aside), even though the gateway quietly asks
the upstream for usage to record tokens. Chunks must reach the client as they arrive.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread

UPSTREAM_MODEL = "upstream-model"
MESSAGES = [{"role": "user", "content": "stream me a few words please"}]
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
_VOLATILE_STRINGS = re.compile(rb'"(id|call_id|item_id)":"[^"]*"')
_VOLATILE_NUMBERS = re.compile(rb'"(created|created_at)":\d+')

# (route, body without `model`): every stream shape a client can ask for.
STREAMS = [
    pytest.param("chat/completions", {"messages": MESSAGES, "stream": True}, id="chat"),
    pytest.param(
        "chat/completions",
        {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
        id="chat-include-usage",
    ),
    pytest.param(
        "chat/completions",
        {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": False}},
        id="chat-usage-false",
    ),
    pytest.param(
        "chat/completions",
        {"messages": MESSAGES, "stream": True, "tools": [WEATHER_TOOL]},
        id="chat-tool-call",
    ),
    pytest.param("completions", {"prompt": "a b c d", "stream": True}, id="completions"),
    pytest.param(
        "completions",
        {"prompt": "a b c d", "stream": True, "stream_options": {"include_usage": True}},
        id="completions-include-usage",
    ),
    pytest.param("responses", {"input": "say hello", "stream": True}, id="responses"),
]


def normalize_sse(raw: bytes) -> bytes:
    """Blank the values the fake provider counts per request or takes from the clock."""
    return _VOLATILE_NUMBERS.sub(rb'"\1":0', _VOLATILE_STRINGS.sub(rb'"\1":"X"', raw))


def sse_data(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE byte stream, JSON-decoded (`[DONE]` kept as a string)."""
    out: list[Any] = []
    for line in raw.splitlines():
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


@pytest.fixture
def gateway(module_gateway: GatewayThread, fake_provider: FakeProviderThread) -> GatewayThread:
    """The module's gateway, with the fake provider's requests and faults cleared."""
    return module_gateway


@pytest.fixture
def rid() -> str:
    return f"stream-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def read_stream(http: httpx.Client, url: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with http.stream(
        "POST", url, json=body, headers={"Authorization": "Bearer sk-client"}
    ) as response:
        raw = b"".join(response.iter_raw())
    return response, raw


@pytest.mark.parametrize(("route", "body"), STREAMS)
def test_client_reads_the_same_stream_bytes_as_directly_from_the_upstream(
    gateway: GatewayThread,
    rid: str,
    fake_provider: FakeProviderThread,
    http: httpx.Client,
    route: str,
    body: dict[str, Any],
) -> None:
    through, through_raw = read_stream(
        http, f"{gateway.url(rid, '1')}/{route}", {"model": "gpt-test", **body}
    )
    direct, direct_raw = read_stream(
        http, f"{fake_provider.url}/{route}", {"model": UPSTREAM_MODEL, **body}
    )

    assert through.status_code == direct.status_code == 200
    assert through.headers["content-type"].startswith("text/event-stream")
    assert normalize_sse(through_raw) == normalize_sse(direct_raw)
    (span,) = gateway.spans(rollout_id=rid)
    assert span["stream"] == 1
    assert span["status"] == "ok"
    assert span["input_tokens"] is not None
    assert span["output_tokens"] is not None


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_stream_without_include_usage_hides_the_usage_the_gateway_asked_for(
    gateway: GatewayThread,
    rid: str,
    fake_provider: FakeProviderThread,
    http: httpx.Client,
    route: str,
) -> None:
    body: dict[str, Any] = {"model": "gpt-test", "stream": True}
    body.update({"messages": MESSAGES} if route == "chat/completions" else {"prompt": "a b c"})
    _, raw = read_stream(http, f"{gateway.url(rid, '1')}/{route}", body)

    assert b'"usage"' not in raw
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    assert all(event["choices"] for event in events[:-1])
    sent_upstream = fake_provider.state.last_request.body
    assert sent_upstream["stream_options"]["include_usage"] is True
    # The upstream's usage still lands on the span.
    direct_body = {**body, "model": UPSTREAM_MODEL, "stream": False}
    with openai.OpenAI(base_url=fake_provider.url, api_key="k", max_retries=0) as direct:
        if route == "chat/completions":
            usage = direct.chat.completions.create(**direct_body).usage
        else:
            usage = direct.completions.create(**direct_body).usage
    assert usage is not None
    (span,) = gateway.spans(rollout_id=rid)
    assert span["input_tokens"] == usage.prompt_tokens
    assert span["output_tokens"] == usage.completion_tokens


def test_sdk_stream_without_include_usage_sees_no_usage_on_any_chunk(
    gateway: GatewayThread,
    rid: str,
) -> None:
    with openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        )

    assert chunks
    assert all(chunk.usage is None for chunk in chunks)
    assert all("usage" not in chunk.model_dump(exclude_unset=True) for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    (span,) = gateway.spans(rollout_id=rid)
    assert span["input_tokens"] > 0
    assert span["output_tokens"] == 7  # "echo: stream me a few words please"


def test_chunks_reach_the_client_as_they_arrive_not_buffered(
    gateway: GatewayThread, rid: str, fake_provider: FakeProviderThread
) -> None:
    # "echo: hi there" -> role, "echo:", " hi", " there", finish, usage, [DONE]: six gaps.
    delay = 0.15
    fake_provider.state.add_fault(chunk_delay=delay)
    arrivals: list[tuple[float, str]] = []
    with openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client:
        start = time.monotonic()
        stream = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic() - start, chunk.choices[0].delta.content))
        total = time.monotonic() - start

    assert "".join(text for _, text in arrivals) == "echo: hi there"
    assert total >= 5 * delay
    # Buffered, every word would arrive together at the end of the stream.
    first, last = arrivals[0][0], arrivals[-1][0]
    assert first <= total - 2 * delay, f"first token at {first:.3f}s of {total:.3f}s"
    assert last - first >= delay, f"words arrived within {last - first:.3f}s"
    (span,) = gateway.spans(rollout_id=rid)
    assert span["ttft_ms"] is not None
    assert delay * 1000 * 0.8 <= span["ttft_ms"] <= span["duration_ms"]
    assert span["duration_ms"] >= 5 * delay * 1000


def test_streamed_chat_span_holds_the_assembled_completion(
    gateway: GatewayThread, rid: str
) -> None:
    with openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None
    (span,) = gateway.spans(rollout_id=rid)
    body = span["response_body"]
    assert body["object"] == "chat.completion"
    assert body["id"] == chunks[0].id == span["response_id"]
    assert body["model"] == UPSTREAM_MODEL == span["response_model"]
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == usage.model_dump(mode="json", exclude_unset=True)
    assert span["finish_reasons"] == ["stop"]
    assert span["input_tokens"] == usage.prompt_tokens
    assert span["output_tokens"] == usage.completion_tokens
    assert span["cached_tokens"] == 0
    assert span["reasoning_tokens"] == 0
    assert span["ttft_ms"] is not None
    assert 0 < span["ttft_ms"] <= span["duration_ms"]


def test_streamed_tool_call_span_holds_the_full_arguments(gateway: GatewayThread, rid: str) -> None:
    with (
        openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client,
        client.chat.completions.stream(
            model="gpt-test", messages=MESSAGES, tools=[WEATHER_TOOL]
        ) as stream,
    ):
        final = stream.get_final_completion()

    (call,) = final.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "test", "days": 1}
    (span,) = gateway.spans(rollout_id=rid)
    assert span["tool_calls"] == [
        {
            "id": call.id,
            "type": "function",
            "name": "get_weather",
            "arguments": call.function.arguments,
        }
    ]
    assert span["finish_reasons"] == ["tool_calls"]
    message = span["response_body"]["choices"][0]["message"]
    assert message["tool_calls"] == [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments},
        }
    ]
    assert span["ttft_ms"] is not None
    assert span["ttft_ms"] <= span["duration_ms"]


def test_streamed_text_completion_span_holds_the_full_text(
    gateway: GatewayThread, rid: str
) -> None:
    with openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client:
        chunks = list(
            client.completions.create(model="gpt-test", prompt="one two three", stream=True)
        )

    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "echo: one two three"
    (span,) = gateway.spans(rollout_id=rid)
    assert span["operation"] == "text_completion"
    assert span["response_body"]["choices"][0]["text"] == text
    assert span["response_body"]["choices"][0]["finish_reason"] == "stop"
    assert span["response_id"] == chunks[0].id
    assert span["output_tokens"] == 4


def test_streamed_responses_span_holds_the_completed_response(
    gateway: GatewayThread, rid: str
) -> None:
    with openai.OpenAI(base_url=gateway.url(rid, "1"), api_key="k", max_retries=0) as client:
        events = list(client.responses.create(model="gpt-test", input="say hello", stream=True))

    final = events[-1].response
    (span,) = gateway.spans(rollout_id=rid)
    assert span["operation"] == "responses"
    assert span["response_body"] == final.model_dump(mode="json", exclude_unset=True)
    assert span["response_id"] == final.id
    assert span["finish_reasons"] == ["completed"]
    assert span["input_tokens"] == final.usage.input_tokens
    assert span["output_tokens"] == final.usage.output_tokens
    assert span["ttft_ms"] is not None
    assert span["ttft_ms"] <= span["duration_ms"]
