"""Checks the fake provider against the official openai SDK, so gateway tests can trust it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fake_provider import (
    FakeProviderThread,
    Fault,
    chat_reply_text,
    count_prompt_tokens,
    embedding_for,
    start_fake_provider,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "verbose": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
EXPECTED_ARGS = {"city": "test", "days": 1, "unit": "celsius"}
HELLO = [{"role": "user", "content": "hello brave new world"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as fp:
        yield fp


@pytest.fixture
def fp(server: FakeProviderThread) -> FakeProviderThread:
    server.state.reset()
    server.state.latency = 0.0
    server.state.api_key = None
    return server


@pytest.fixture
def client(fp: FakeProviderThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fp.url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def sse_payloads(fp: FakeProviderThread, body: dict[str, object]) -> list[str]:
    """The raw `data:` payloads of a chat stream, to check key presence the SDK hides."""
    with (
        httpx.Client() as http,
        http.stream("POST", fp.url + "/chat/completions", json=body) as resp,
    ):
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]


def test_plain_chat(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.system_fingerprint
    assert resp.choices[0].message.content == "echo: hello brave new world"
    assert resp.choices[0].message.content == chat_reply_text(HELLO)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_prompt_tokens(["hello brave new world"])
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5

    seen = fp.state.last_request
    assert seen.method == "POST"
    assert seen.path == "/v1/chat/completions"
    assert seen.header("Authorization") == "Bearer x"
    assert seen.body["model"] == "gpt-4o-mini"


def test_max_tokens_cuts_reply(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    assert resp.choices[0].message.content == "echo: hello"
    assert resp.choices[0].finish_reason == "length"


def test_stream_chat_without_usage(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "echo: hello brave new world"
    assert len(chunks) == 1 + 5 + 1  # role chunk, one per word, finish chunk
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)

    raw = sse_payloads(fp, {"model": "m", "messages": HELLO, "stream": True})
    assert raw[-1] == "[DONE]"
    assert all("usage" not in json.loads(p) for p in raw[:-1])
    assert all(", " not in p and '": ' not in p for p in raw)  # compact JSON


def test_stream_chat_with_usage(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, usage_chunk = chunks
    assert content[-1].choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert fp.state.last_request.body["stream_options"] == {"include_usage": True}

    raw = sse_payloads(
        fp,
        {
            "model": "m",
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert raw[-1] == "[DONE]"
    events = [json.loads(p) for p in raw[:-1]]
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5


def test_stream_events_are_flushed_separately(fp: FakeProviderThread) -> None:
    fp.state.add_fault(chunk_delay=0.05)
    arrivals: list[float] = []
    with (
        httpx.Client() as http,
        http.stream(
            "POST",
            fp.url + "/chat/completions",
            json={"model": "m", "messages": HELLO, "stream": True},
        ) as resp,
    ):
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 8
    # Had the events been buffered into one write they would all arrive together.
    assert arrivals[-1] - arrivals[0] >= 0.25


def test_tool_call_plain(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER_TOOL])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == EXPECTED_ARGS


def test_no_tool_call_after_tool_result_or_when_disabled(client: openai.OpenAI) -> None:
    after_tool = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = client.chat.completions.create(model="m", messages=after_tool, tools=[WEATHER_TOOL])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == "echo: hello brave new world"

    resp = client.chat.completions.create(
        model="m", messages=HELLO, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert resp.choices[0].message.tool_calls is None


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER_TOOL], stream=True)
    )
    first = chunks[0].choices[0].delta.tool_calls
    assert first is not None and first[0].id and first[0].function is not None
    assert first[0].function.name == "get_weather"
    assert first[0].function.arguments == ""
    fragments = [
        tc.function.arguments
        for c in chunks[1:]
        for tc in c.choices[0].delta.tool_calls or []
        if tc.function is not None and tc.function.arguments
    ]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == EXPECTED_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The SDK's own accumulator must reassemble the same call.
    with client.chat.completions.stream(model="m", messages=HELLO, tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == EXPECTED_ARGS


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say something")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "echo: say something"
    assert resp.usage is not None and resp.usage.completion_tokens == 3

    chunks = list(
        client.completions.create(
            model="m", prompt="say something", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: say something"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_embeddings(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default; the float form must decode to the same vectors.
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a", "bb"])
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.data[0].embedding == pytest.approx(embedding_for("a"))
    assert resp.data[1].embedding == pytest.approx(embedding_for("bb"))
    assert resp.usage.prompt_tokens == 2

    floats = client.embeddings.create(model="m", input="a", encoding_format="float", dimensions=4)
    assert floats.data[0].embedding == pytest.approx(embedding_for("a", 4))


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_responses_plain(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="gpt-4o", input="hello there", instructions="be brief")
    assert resp.id.startswith("resp_")
    assert resp.status == "completed"
    assert resp.model == "gpt-4o"
    assert resp.output_text == "echo: hello there"
    assert resp.usage is not None
    assert resp.usage.input_tokens == count_prompt_tokens(["be brief", "hello there"])
    assert resp.usage.output_tokens == 3
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o", input="hello there", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "echo: hello there"
    final = events[-1].response
    assert final.output_text == "echo: hello there"
    assert final.usage is not None and final.usage.total_tokens == final.usage.input_tokens + 3


def test_responses_function_call(client: openai.OpenAI) -> None:
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    resp = client.responses.create(model="m", input="weather?", tools=[tool])
    (item,) = resp.output
    assert item.type == "function_call"
    assert json.loads(item.arguments) == EXPECTED_ARGS

    events = list(client.responses.create(model="m", input="weather?", tools=[tool], stream=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert json.loads("".join(deltas)) == EXPECTED_ARGS
    assert events[-1].type == "response.completed"


def test_rate_limit_fault(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.add_fault(status=429, headers={"Retry-After": "2", "retry-after-ms": "2000"})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=HELLO)
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.response.headers["retry-after-ms"] == "2000"
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    # The fault was consumed; the next request is served normally.
    assert client.chat.completions.create(model="m", messages=HELLO).choices
    assert fp.state.pending_faults == []


def test_faults_are_fifo(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.add_fault(status=500, times=2)
    fp.state.add_fault(Fault(status=503, message="busy"))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=HELLO)
        assert info.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=HELLO)
    assert info.value.status_code == 503
    assert info.value.response.json()["error"]["message"] == "busy"
    assert len(fp.state.requests) == 3


def test_connection_reset(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.add_fault(reset=True)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=HELLO)
    # The upstream did see the request before hanging up.
    assert len(fp.state.requests) == 1


def test_delay_fault_times_out(fp: FakeProviderThread) -> None:
    fp.state.add_fault(delay=5.0)
    with (
        openai.OpenAI(base_url=fp.url, api_key="x", max_retries=0, timeout=0.2) as c,
        pytest.raises(openai.APITimeoutError),
    ):
        c.chat.completions.create(model="m", messages=HELLO)


def test_truncated_stream(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.add_fault(truncate_after=2)
    stream = client.chat.completions.create(model="m", messages=HELLO, stream=True)
    received = []
    # The SDK does not wrap errors raised while iterating, so httpx's own surfaces.
    with pytest.raises(httpx.RemoteProtocolError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 2

    fp.state.add_fault(truncate_after=1)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=HELLO)


def test_malformed_body(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.add_fault(malformed=True)
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="m", messages=HELLO)

    fp.state.add_fault(malformed=True)
    with pytest.raises(json.JSONDecodeError):
        list(client.chat.completions.create(model="m", messages=HELLO, stream=True))


def test_api_key_required(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    fp.state.api_key = "secret"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="m", messages=HELLO)
    with openai.OpenAI(base_url=fp.url, api_key="secret", max_retries=0) as ok:
        assert ok.chat.completions.create(model="m", messages=HELLO).choices


def test_http_control_routes(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    with httpx.Client(base_url=fp.root_url) as http:
        queued = http.post("/_fault", json=[{"status": 429, "type": "tokens"}, {"reset": True}])
        assert queued.json() == {"queued": 2}
        assert http.post("/_fault", json={"statsu": 500}).status_code == 400

        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="m", messages=HELLO)
        assert info.value.response.json()["error"]["type"] == "tokens"
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=HELLO)

        seen = http.get("/_requests").json()
        assert [r["path"] for r in seen] == ["/v1/chat/completions"] * 2
        assert seen[0]["headers"]["authorization"] == "Bearer x"
        assert seen[0]["body"]["messages"] == HELLO

        http.post("/_fault", json={"status": 500})
        assert http.post("/_reset", json={"latency": 0.0}).json() == {"ok": True}
        assert http.get("/_requests").json() == []
    assert fp.state.pending_faults == []


def test_wait_for_requests(client: openai.OpenAI, fp: FakeProviderThread) -> None:
    client.chat.completions.create(model="m", messages=HELLO)
    assert len(fp.state.wait_for_requests(1, timeout=1.0)) == 1
    with pytest.raises(TimeoutError):
        fp.state.wait_for_requests(2, timeout=0.05)


def test_start_fake_provider_async() -> None:
    async def scenario() -> None:
        server = await start_fake_provider()
        try:
            assert server.url == f"http://127.0.0.1:{server.port}/v1"
            async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0) as c:
                resp = await c.chat.completions.create(model="m", messages=HELLO)
                assert resp.choices[0].message.content == "echo: hello brave new world"
                stream = await c.chat.completions.create(model="m", messages=HELLO, stream=True)
                assert len([chunk async for chunk in stream]) == 7
            assert len(await server.state.wait_for_requests_async(2, timeout=1.0)) == 2
        finally:
            await server.close()

    asyncio.run(scenario())


def test_runs_as_its_own_process() -> None:
    script = Path(__file__).with_name("fake_provider.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--latency", "0.01"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as c:
            assert c.chat.completions.create(model="m", messages=HELLO).choices
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
