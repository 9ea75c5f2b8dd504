"""litellm-routed providers answer in OpenAI's wire format, checked against a respx-mocked Anthropic."""

from __future__ import annotations

import asyncio
import base64
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
import respx

from config.models import Deployment
from gateway.errors import (
    InvalidRequest,
    UpstreamAnswerUnreadable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.providers.base import UpstreamRequest, UpstreamResponse
from gateway.providers.litellm import LiteLLMProvider, is_litellm_provider, load_litellm
from gateway.proxy.streaming import ChatAssembler, SSESplitter, parse_event

MESSAGES_URL = "https://api.anthropic.com/v1/messages"
MODEL = "claude-3-5-haiku-20241022"
HELLO = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 3},
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n".encode()


MESSAGE_START = sse_event(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_stream01",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    },
)


def text_stream(*pieces: str, output_tokens: int = 3) -> list[bytes]:
    """Anthropic's event stream for a text answer, as the Messages API sends it."""
    return [
        MESSAGE_START,
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse_event("ping", {"type": "ping"}),
        *(
            sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in pieces
        ),
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]


def sse_response(events: list[bytes]) -> httpx.Response:
    return httpx.Response(
        200, content=b"".join(events), headers={"content-type": "text/event-stream"}
    )


def anthropic_error(status: int, kind: str, message: str, **headers: str) -> httpx.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return httpx.Response(status, json=body, headers=headers)


def make_request(
    payload: dict[str, Any],
    *,
    operation: str = "chat",
    client_headers: dict[str, str] | None = None,
    **deployment: Any,
) -> UpstreamRequest:
    fields = {"provider": "anthropic", "model": MODEL, "api_key": "sk-ant-test", **deployment}
    payload = {"model": MODEL, **payload}
    return UpstreamRequest(
        operation=operation,
        body=orjson.dumps(payload),
        payload=payload,
        stream=bool(payload.get("stream")),
        deployment=Deployment(**fields),
        client_headers=client_headers or {},
    )


def chat(text: str = "Hi there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def body_of(response: UpstreamResponse) -> dict[str, Any]:
    assert response.body is not None
    return orjson.loads(response.body)


async def read_events(response: UpstreamResponse) -> list[bytes]:
    """The `data:` payloads of a streamed answer, split the way the gateway splits them."""
    assert response.chunks is not None
    splitter = SSESplitter()
    events = []
    async for chunk in response.chunks:
        events.extend(parse_event(raw)[1] for raw in splitter.feed(chunk))
    assert splitter.rest() == b""
    return events


@pytest.fixture(scope="module", autouse=True)
def _litellm_loaded() -> None:
    # Seconds of import, paid once for the module rather than inside the first test's timeout.
    load_litellm()


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    # assert_all_mocked: any request that no route matches fails instead of leaving the box.
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest_asyncio.fixture
async def provider(upstream: respx.MockRouter) -> AsyncIterator[LiteLLMProvider]:
    # Depends on `upstream` so the mock outlives calls still ending when the test is done.
    provider = LiteLLMProvider()
    yield provider
    await provider.aclose()


@pytest.mark.asyncio
async def test_plain_chat_is_translated_both_ways(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post(MESSAGES_URL).mock(return_value=httpx.Response(200, json=HELLO))
    response = await provider(make_request(chat("Say hello", max_tokens=50, temperature=0.2)))

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    body = body_of(response)
    assert body["object"] == "chat.completion"
    assert body["id"] and isinstance(body["created"], int)
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello!"
    assert "tool_calls" not in choice["message"]
    assert body["usage"]["prompt_tokens"] == 10
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == 13

    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert "authorization" not in sent.headers
    assert "anthropic-version" in sent.headers
    upstream = orjson.loads(sent.content)
    assert upstream["model"] == MODEL
    assert upstream["max_tokens"] == 50
    assert upstream["temperature"] == 0.2
    assert upstream["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}
    ]


@pytest.mark.asyncio
async def test_client_bearer_token_is_the_key_when_the_deployment_has_none(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post(MESSAGES_URL).mock(return_value=httpx.Response(200, json=HELLO))
    request = make_request(
        chat(), api_key=None, client_headers={"authorization": "Bearer sk-ant-from-client"}
    )
    response = await provider(request)
    assert response.status == 200
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-from-client"


@pytest.mark.asyncio
async def test_api_base_comes_from_the_deployment(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post("https://anthropic.internal.example/v1/messages").mock(
        return_value=httpx.Response(200, json=HELLO)
    )
    response = await provider(make_request(chat(), api_base="https://anthropic.internal.example"))
    assert response.status == 200
    assert route.called


@pytest.mark.asyncio
async def test_client_cannot_steer_litellm_through_the_body(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    # litellm reads these as its own settings; from a client they must be ignored.
    route = upstream.post(MESSAGES_URL).mock(return_value=httpx.Response(200, json=HELLO))
    payload = chat(
        api_base="http://attacker.example", mock_response="pwned", api_key="sk-client-supplied"
    )
    response = await provider(make_request(payload))
    assert body_of(response)["choices"][0]["message"]["content"] == "Hello!"
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-test"


@pytest.mark.asyncio
async def test_tool_use_becomes_openai_tool_calls(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    answer = {
        **HELLO,
        "content": [
            {"type": "text", "text": "Let me check."},
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "output_tokens": 15},
    }
    route = upstream.post(MESSAGES_URL).mock(return_value=httpx.Response(200, json=answer))
    response = await provider(
        make_request(chat("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="auto"))
    )

    (choice,) = body_of(response)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    (call,) = choice["message"]["tool_calls"]
    assert call == {
        "id": "toolu_01A09q90qw90lq917835lq9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": call["function"]["arguments"]},
    }
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}

    upstream = orjson.loads(route.calls.last.request.content)
    (tool,) = upstream["tools"]
    assert tool["name"] == "get_weather"
    assert tool["input_schema"] == WEATHER_TOOL["function"]["parameters"]
    assert upstream["tool_choice"] == {"type": "auto"}


@pytest.mark.asyncio
async def test_stream_is_openai_chunks_with_usage_and_done(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post(MESSAGES_URL).mock(
        return_value=sse_response(text_stream("Hello", " there", "!"))
    )
    request = make_request(chat(stream=True, stream_options={"include_usage": True}))
    response = await provider(request)

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    events = await read_events(response)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(data) for data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert text == "Hello there!"
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]]
    assert finishes[-1] == "stop"
    *content_chunks, usage_chunk = chunks
    assert all("usage" not in chunk for chunk in content_chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 10
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == 13

    # What the gateway records from these bytes is the plain answer.
    assembler = ChatAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    record = assembler.result()
    assert record["choices"][0]["message"] == {"role": "assistant", "content": "Hello there!"}
    assert record["choices"][0]["finish_reason"] == "stop"
    assert record["usage"]["completion_tokens"] == 3

    upstream = orjson.loads(route.calls.last.request.content)
    assert upstream["stream"] is True


@pytest.mark.asyncio
async def test_stream_without_include_usage_has_no_usage_chunk(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(return_value=sse_response(text_stream("Hi")))
    response = await provider(make_request(chat(stream=True)))
    events = await read_events(response)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(data) for data in events[:-1]]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)


@pytest.mark.asyncio
async def test_streamed_tool_call_assembles_to_json_arguments(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    events = [
        MESSAGE_START,
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_stream1",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        *(
            sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                },
            )
            for part in ('{"city": ', '"Paris"}')
        ),
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 12},
            },
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]
    upstream.post(MESSAGES_URL).mock(return_value=sse_response(events))
    response = await provider(make_request(chat(stream=True, tools=[WEATHER_TOOL])))

    assembler = ChatAssembler()
    for data in (await read_events(response))[:-1]:
        assembler.add(orjson.loads(data))
    (choice,) = assembler.result()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_stream1"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.asyncio
async def test_rate_limit_keeps_status_retry_after_and_openai_error_shape(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post(MESSAGES_URL).mock(
        return_value=anthropic_error(429, "rate_limit_error", "slow down", **{"retry-after": "7"})
    )
    response = await provider(make_request(chat()))
    assert route.call_count == 1  # litellm does not retry: the gateway's policy decides
    assert response.status == 429
    assert response.headers["retry-after"] == "7"
    assert body_of(response) == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


@pytest.mark.asyncio
async def test_a_failure_before_the_stream_starts_is_a_plain_error_answer(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    # So the gateway can still retry or fall back: nothing has reached the client.
    upstream.post(MESSAGES_URL).mock(
        return_value=anthropic_error(429, "rate_limit_error", "slow down")
    )
    response = await provider(make_request(chat(stream=True)))
    assert response.status == 429
    assert response.chunks is None
    assert body_of(response)["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.asyncio
async def test_prompt_too_long_is_context_length_exceeded(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(
        return_value=anthropic_error(
            400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"
        )
    )
    response = await provider(make_request(chat()))
    assert response.status == 400
    error = body_of(response)["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "prompt is too long: 250000 tokens > 200000 maximum"


@pytest.mark.parametrize(
    ("status", "kind", "expected_type", "expected_code"),
    [
        (401, "authentication_error", "authentication_error", "invalid_api_key"),
        (404, "not_found_error", "invalid_request_error", "model_not_found"),
        (500, "api_error", "api_error", "api_error"),
        # litellm turns Anthropic's "overloaded" into a 500; the client gets the real status.
        (529, "overloaded_error", "api_error", "overloaded_error"),
    ],
)
@pytest.mark.asyncio
async def test_upstream_statuses_pass_through(
    provider: LiteLLMProvider,
    upstream: respx.MockRouter,
    status: int,
    kind: str,
    expected_type: str,
    expected_code: str,
) -> None:
    upstream.post(MESSAGES_URL).mock(return_value=anthropic_error(status, kind, "nope"))
    response = await provider(make_request(chat()))
    assert response.status == status
    error = body_of(response)["error"]
    assert (error["type"], error["code"], error["message"]) == (
        expected_type,
        expected_code,
        "nope",
    )


@pytest.mark.asyncio
async def test_an_echoed_api_key_is_redacted(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(
        return_value=anthropic_error(401, "authentication_error", "bad key sk-ant-test given")
    )
    response = await provider(make_request(chat()))
    assert response.body is not None
    assert b"sk-ant-test" not in response.body
    assert body_of(response)["error"]["message"] == "bad key [redacted] given"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.asyncio
async def test_connection_failure_raises_upstream_unreachable(
    provider: LiteLLMProvider, upstream: respx.MockRouter, stream: bool
) -> None:
    upstream.post(MESSAGES_URL).mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(UpstreamUnreachable) as caught:
        await provider(make_request(chat(stream=stream)))
    assert caught.value.__cause__ is not None
    assert "sk-ant-test" not in caught.value.message


@pytest.mark.asyncio
async def test_read_timeout_raises_upstream_timeout(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(side_effect=httpx.ReadTimeout("too slow"))
    with pytest.raises(UpstreamTimeout):
        await provider(make_request(chat()))


async def _stall(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(1.0)
    return httpx.Response(200, json=HELLO)


@pytest.mark.asyncio
async def test_total_timeout_bounds_the_whole_call(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(side_effect=_stall)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout):
        await provider(make_request(chat(), timeout={"total": 0.3, "connect": 0.3}))
    assert asyncio.get_running_loop().time() - started < 0.9
    # The abandoned call ends on its own; closing the provider waits for it, warning-free.


@pytest.mark.asyncio
async def test_a_cancelled_call_is_left_to_finish_quietly(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    # The gateway cancels the call when its client disconnects, at any moment.
    route = upstream.post(MESSAGES_URL).mock(side_effect=_stall)
    call = asyncio.ensure_future(provider(make_request(chat())))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await provider.aclose()
    assert route.called


@pytest.mark.asyncio
async def test_a_stream_broken_midway_raises_from_the_chunks(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    head = text_stream("Hel", "lo")[:4]

    async def broken() -> AsyncIterator[bytes]:
        for event in head:
            yield event
        raise httpx.ReadError("connection reset by peer")

    upstream.post(MESSAGES_URL).mock(
        return_value=httpx.Response(
            200, content=broken(), headers={"content-type": "text/event-stream"}
        )
    )
    response = await provider(make_request(chat(stream=True)))
    assert response.chunks is not None
    received: list[bytes] = []
    with pytest.raises(UpstreamUnreachable):
        async for chunk in response.chunks:
            received.append(chunk)
    first = orjson.loads(parse_event(received[0])[1])
    assert first["choices"][0]["delta"]["content"] == "Hel"


@pytest.mark.asyncio
async def test_an_error_event_midstream_raises_from_the_chunks(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    upstream.post(MESSAGES_URL).mock(
        return_value=sse_response([MESSAGE_START, sse_event("error", error)])
    )
    response = await provider(make_request(chat(stream=True)))
    assert response.chunks is not None
    with pytest.raises(UpstreamUnreachable, match="Overloaded"):
        async for _ in response.chunks:
            pass


@pytest.mark.asyncio
async def test_an_unreadable_answer_is_a_protocol_error_never_sent_again(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(
        return_value=httpx.Response(
            200, text="<html>oops</html>", headers={"content-type": "text/html"}
        )
    )
    # The upstream answered (and billed): the retry policy takes this error as final.
    with pytest.raises(UpstreamAnswerUnreadable):
        await provider(make_request(chat()))


@pytest.mark.asyncio
async def test_responses_api_is_refused(provider: LiteLLMProvider) -> None:
    request = make_request({"input": "hi"}, operation="responses")
    with pytest.raises(InvalidRequest, match="not supported") as caught:
        await provider(request)
    assert caught.value.status == 400


@pytest.mark.asyncio
async def test_text_completion_goes_through_the_messages_api(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    answer = {**HELLO, "content": [{"type": "text", "text": "Paris."}]}
    route = upstream.post(MESSAGES_URL).mock(return_value=httpx.Response(200, json=answer))
    request = make_request(
        {"prompt": "The capital of France is", "max_tokens": 5}, operation="text_completion"
    )
    body = body_of(await provider(request))
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "Paris.", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"]["prompt_tokens"] == 10
    upstream = orjson.loads(route.calls.last.request.content)
    assert upstream["messages"][0]["content"][0]["text"] == "The capital of France is"


@pytest.mark.asyncio
async def test_streamed_text_completion_is_openai_chunks(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(return_value=sse_response(text_stream("Par", "is.")))
    request = make_request(
        {
            "prompt": "The capital of France is",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        operation="text_completion",
    )
    events = await read_events(await provider(request))
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(data) for data in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    assert text == "Paris."
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.asyncio
async def test_a_client_leaving_midstream_closes_quietly(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    upstream.post(MESSAGES_URL).mock(return_value=sse_response(text_stream("a", "b", "c")))
    response = await provider(make_request(chat(stream=True)))
    assert response.chunks is not None
    first = await anext(response.chunks)
    assert first.startswith(b"data: ")
    await response.chunks.aclose()  # what the gateway does when its client disconnects


@pytest.mark.asyncio
async def test_embeddings_in_openai_shape_and_base64(
    provider: LiteLLMProvider, upstream: respx.MockRouter
) -> None:
    route = upstream.post("https://api.cohere.ai/v2/embed").mock(
        return_value=httpx.Response(
            200,
            json={
                "id": "emb-1",
                "embeddings": {"float": [[0.5, 0.25, -1.0]]},
                "texts": ["hello"],
                "meta": {"billed_units": {"input_tokens": 2}},
            },
        )
    )
    request = make_request(
        {"input": ["hello"], "encoding_format": "base64"},
        operation="embeddings",
        provider="cohere",
        model="embed-english-v3.0",
        api_key="co-test-key",
    )
    body = body_of(await provider(request))
    assert body["object"] == "list"
    (item,) = body["data"]
    assert item["object"] == "embedding"
    assert struct.unpack("<3f", base64.b64decode(item["embedding"])) == (0.5, 0.25, -1.0)
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert route.calls.last.request.headers["authorization"] == "Bearer co-test-key"


def test_provider_names_are_litellm_s() -> None:
    assert is_litellm_provider("anthropic")
    assert is_litellm_provider("bedrock")
    assert not is_litellm_provider("no-such-provider")


def test_importing_the_module_does_not_import_litellm() -> None:
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "import gateway.providers.litellm as p\n"
        "assert 'litellm' not in sys.modules, 'litellm imported eagerly'\n"
        "assert not p.litellm_loaded()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
