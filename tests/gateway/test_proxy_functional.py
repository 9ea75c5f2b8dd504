"""The gateway as an OpenAI-compatible proxy, driven by the official `openai` SDK.

Every route (plain and streamed where the API streams) under every prefix must give the
client exactly what the upstream would have given it directly; the upstream must see the
deployment's model name and key, never the client's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows

from store.queries import decode_row

UPSTREAM_MODEL = "upstream-model"
UPSTREAM_KEY = "sk-upstream-secret"
CLIENT_KEY = "sk-client-key-for-tests"
# Keys whose values the fake provider counts up per request, or sets from the clock.
VOLATILE_KEYS = frozenset({"id", "call_id", "item_id", "created", "created_at"})

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER_ARGUMENTS = {"city": "test", "unit": "celsius"}


def normalized(value: Any) -> Any:
    """`value` (an SDK object, dict or list) as plain JSON, with ids and clocks blanked."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {
            key: ("<volatile>" if key in VOLATILE_KEYS else normalized(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [normalized(item) for item in value]
    return value


@pytest.fixture
def gateway(module_gateway: GatewayThread, fake_provider: FakeProviderThread) -> GatewayThread:
    """The module's gateway, with the fake provider's requests and faults cleared."""
    return module_gateway


class NewSpans:
    """The spans a test recorded: those written after it started, in rollout/seq order."""

    def __init__(self, gateway: GatewayThread) -> None:
        gateway.flush()
        self.gateway = gateway
        self.mark = self._max_rowid(gateway.db_path)

    @staticmethod
    def _max_rowid(db_path: Path) -> int:
        return int(read_rows(db_path, "select coalesce(max(rowid), 0) as m from spans")[0]["m"])

    def __call__(self) -> list[dict[str, Any]]:
        self.gateway.flush()
        rows = read_rows(
            self.gateway.db_path,
            "select * from spans where rowid > ? order by rollout_id, seq, rowid",
            self.mark,
        )
        return [decode_row(row) for row in rows]


@pytest.fixture
def recorded(gateway: GatewayThread) -> NewSpans:
    return NewSpans(gateway)


@pytest.fixture
def rid() -> str:
    """A rollout id of this test's own, so sequence numbers start at 1."""
    return f"task-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["v1", "rollout", "rollout-attempt"])
def prefix(request: pytest.FixtureRequest, rid: str) -> tuple[str | None, str | None]:
    """(rollout, attempt) for /v1, /rollout/{rid}/v1 and /rollout/{rid}/attempt/{aid}/v1."""
    return {
        "v1": (None, None),
        "rollout": (rid, None),
        "rollout-attempt": (rid, "try-2"),
    }[request.param]


@pytest.fixture
def direct(fake_provider: FakeProviderThread) -> Iterator[openai.OpenAI]:
    """A client talking to the fake provider directly: what the user would get without us."""
    with openai.OpenAI(base_url=fake_provider.url, api_key=UPSTREAM_KEY, max_retries=0) as client:
        yield client


def gateway_client(
    gateway: GatewayThread, rollout: str | None, attempt: str | None
) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url(rollout, attempt), api_key=CLIENT_KEY, max_retries=0)


def expected_attempt(rollout: str | None, attempt: str | None) -> str | None:
    if rollout is None:
        return None
    return attempt or "1"


def only_span(recorded: NewSpans) -> dict[str, Any]:
    spans = recorded()
    assert len(spans) == 1, f"expected one span, got {len(spans)}"
    return spans[0]


def assert_attributed(
    span: dict[str, Any], rollout: str | None, attempt: str | None, operation: str, stream: bool
) -> None:
    assert span["rollout_id"] == rollout
    assert span["attempt_id"] == expected_attempt(rollout, attempt)
    assert span["seq"] == (1 if rollout else None)
    assert span["operation"] == operation
    assert span["stream"] == int(stream)
    assert span["status"] == "ok"


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is the capital of France"},
]


def test_chat_completion_equals_the_direct_reply_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    expected = direct.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)

    assert reply.choices[0].message.content == "echo: what is the capital of France"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage == expected.usage
    assert normalized(reply) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "chat", stream=False)
    assert span["response_id"] == reply.id


def test_streamed_chat_completion_equals_the_direct_stream_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        chunks = list(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        )
    expected = list(
        direct.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: what is the capital of France"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert normalized(chunks) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "chat", stream=True)
    assert span["response_id"] == chunks[0].id


def test_text_completion_equals_the_direct_reply_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        reply = client.completions.create(model="gpt-test", prompt="once upon a time", max_tokens=3)
    expected = direct.completions.create(
        model=UPSTREAM_MODEL, prompt="once upon a time", max_tokens=3
    )

    assert reply.choices[0].text == "echo: once upon"
    assert reply.choices[0].finish_reason == "length"
    assert normalized(reply) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "text_completion", stream=False)
    assert span["output_tokens"] == reply.usage.completion_tokens


def test_streamed_text_completion_equals_the_direct_stream_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        chunks = list(
            client.completions.create(model="gpt-test", prompt="once upon a time", stream=True)
        )
    expected = list(
        direct.completions.create(model=UPSTREAM_MODEL, prompt="once upon a time", stream=True)
    )

    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: once upon a time"
    assert normalized(chunks) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "text_completion", stream=True)
    assert span["finish_reasons"] == ["stop"]


def test_embeddings_equal_the_direct_vectors_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    inputs = ["the cat sat", "on the mat"]
    with gateway_client(gateway, rollout, attempt) as client:
        reply = client.embeddings.create(model="gpt-test", input=inputs)
    expected = direct.embeddings.create(model=UPSTREAM_MODEL, input=inputs)

    assert len(reply.data) == 2
    assert [d.embedding for d in reply.data] == [d.embedding for d in expected.data]
    assert reply.usage == expected.usage
    assert normalized(reply) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "embeddings", stream=False)
    assert span["input_tokens"] == reply.usage.prompt_tokens


def test_responses_api_equals_the_direct_reply_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        reply = client.responses.create(model="gpt-test", input="tell me a joke")
    expected = direct.responses.create(model=UPSTREAM_MODEL, input="tell me a joke")

    assert reply.output_text == "echo: tell me a joke"
    assert reply.usage == expected.usage
    assert normalized(reply) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "responses", stream=False)
    assert span["response_id"] == reply.id


def test_streamed_responses_api_equals_the_direct_events_under_every_prefix(
    gateway: GatewayThread,
    direct: openai.OpenAI,
    recorded: NewSpans,
    prefix: tuple[str | None, str | None],
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        events = list(
            client.responses.create(model="gpt-test", input="tell me a joke", stream=True)
        )
    expected = list(
        direct.responses.create(model=UPSTREAM_MODEL, input="tell me a joke", stream=True)
    )

    assert [e.type for e in events] == [e.type for e in expected]
    assert events[-1].type == "response.completed"
    final = events[-1].response
    assert final.output_text == "echo: tell me a joke"
    assert normalized(events) == normalized(expected)
    span = only_span(recorded)
    assert_attributed(span, rollout, attempt, "responses", stream=True)
    assert span["response_id"] == final.id
    assert span["input_tokens"] == final.usage.input_tokens
    assert span["output_tokens"] == final.usage.output_tokens


def test_models_list_gives_the_configured_group_names_under_every_prefix(
    gateway: GatewayThread, prefix: tuple[str | None, str | None]
) -> None:
    rollout, attempt = prefix
    with gateway_client(gateway, rollout, attempt) as client:
        models = client.models.list()
    assert [m.id for m in models.data] == ["gpt-test", "mock"]
    assert all(m.object == "model" for m in models.data)


def test_chat_tool_call_reply_carries_the_direct_tool_call_with_json_arguments(
    gateway: GatewayThread, direct: openai.OpenAI, recorded: NewSpans, rid: str
) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    with gateway_client(gateway, rid, "1") as client:
        reply = client.chat.completions.create(
            model="gpt-test", messages=messages, tools=[WEATHER_TOOL]
        )
    expected = direct.chat.completions.create(
        model=UPSTREAM_MODEL, messages=messages, tools=[WEATHER_TOOL]
    )

    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGUMENTS
    assert normalized(reply) == normalized(expected)
    span = only_span(recorded)
    assert span["tool_calls"] == [
        {
            "id": call.id,
            "type": "function",
            "name": "get_weather",
            "arguments": call.function.arguments,
        }
    ]
    assert span["finish_reasons"] == ["tool_calls"]


def test_streamed_tool_call_is_assembled_by_the_sdk_stream_helper(
    gateway: GatewayThread, direct: openai.OpenAI, rid: str
) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    with (
        gateway_client(gateway, rid, "1") as client,
        client.chat.completions.stream(
            model="gpt-test", messages=messages, tools=[WEATHER_TOOL]
        ) as stream,
    ):
        final = stream.get_final_completion()
    with direct.chat.completions.stream(
        model=UPSTREAM_MODEL, messages=messages, tools=[WEATHER_TOOL]
    ) as direct_stream:
        expected = direct_stream.get_final_completion()

    assert final.choices[0].finish_reason == "tool_calls"
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGUMENTS
    assert call.function.parsed_arguments == WEATHER_ARGUMENTS
    assert normalized(final) == normalized(expected)


def test_stream_options_include_usage_passes_the_usage_chunk_through(
    gateway: GatewayThread, direct: openai.OpenAI, recorded: NewSpans, rid: str
) -> None:
    with gateway_client(gateway, rid, "1") as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    expected = list(
        direct.chat.completions.create(
            model=UPSTREAM_MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage == expected[-1].usage
    assert all(c.usage is None for c in chunks[:-1])
    assert normalized(chunks) == normalized(expected)
    span = only_span(recorded)
    assert span["input_tokens"] == last.usage.prompt_tokens
    assert span["output_tokens"] == last.usage.completion_tokens


def test_upstream_sees_its_own_model_name_and_key_never_the_clients(
    gateway: GatewayThread, fake_provider: FakeProviderThread, rid: str
) -> None:
    with gateway_client(gateway, rid, "1") as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, temperature=0.25
        )
        raw.parse()
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True).close()
        client.completions.create(model="gpt-test", prompt="hi")
        client.embeddings.create(model="gpt-test", input="hi")
        client.responses.create(model="gpt-test", input="hi")
        list(client.responses.create(model="gpt-test", input="hi", stream=True))

    requests = fake_provider.state.snapshot()
    assert [r.path for r in requests] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses",
    ]
    for request in requests:
        assert request.body["model"] == UPSTREAM_MODEL
        assert request.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert not any(CLIENT_KEY in value for value in request.headers.values())
    # Everything but `model` is forwarded as the client sent it.
    sent = json.loads(raw.http_request.content)
    assert requests[0].body == {**sent, "model": UPSTREAM_MODEL}


def test_mock_model_answers_plain_streamed_and_with_tool_calls_offline(
    gateway: GatewayThread, fake_provider: FakeProviderThread, recorded: NewSpans, rid: str
) -> None:
    messages = [{"role": "user", "content": "hello mock"}]
    with gateway_client(gateway, rid, "1") as client:
        plain = client.chat.completions.create(model="mock", messages=messages)
        chunks = list(
            client.chat.completions.create(
                model="mock",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        tooled = client.chat.completions.create(
            model="mock", messages=messages, tools=[WEATHER_TOOL]
        )

    assert plain.choices[0].message.content
    assert plain.usage is not None
    assert plain.usage.prompt_tokens > 0
    assert plain.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    (call,) = tooled.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    assert fake_provider.state.snapshot() == []
    spans = recorded()
    assert [s["provider"] for s in spans] == ["mock", "mock", "mock"]
    assert [s["seq"] for s in spans] == [1, 2, 3]
