"""What the gateway records: one complete span row per call, response headers that point at
it, no secrets anywhere, and rows that survive restarts and concurrent load."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows, read_spans

from config.loader import parse_settings

pytestmark = pytest.mark.both_backends

UPSTREAM_MODEL = "upstream-model"
UPSTREAM_KEY = "sk-upstream-secret"
CLIENT_KEY = "sk-client-secret-4242"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "name three colours"},
]
# Every column DESIGN.md lists for a span.
SPAN_COLUMNS = {
    "span_id",
    "trace_id",
    "parent_span_id",
    "rollout_id",
    "attempt_id",
    "seq",
    "name",
    "operation",
    "provider",
    "deployment",
    "model_group",
    "request_model",
    "response_model",
    "response_id",
    "status",
    "http_status",
    "error_type",
    "error_message",
    "stream",
    "start_ns",
    "end_ns",
    "duration_ms",
    "ttft_ms",
    "overhead_ms",
    "retries",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "finish_reasons",
    "tool_calls",
    "request_body",
    "response_body",
    "attributes",
    "tags",
}
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def deployment(**extra: Any) -> dict[str, Any]:
    return {"name": "gpt-test", "deployments": [{"model": UPSTREAM_MODEL, **extra}]}


def settings_dict(provider_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "models": [
            deployment(provider="openai", api_base=provider_url, api_key=UPSTREAM_KEY, **extra)
        ]
    }


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=CLIENT_KEY, max_retries=0)


def assert_timings(span: dict[str, Any], before_ns: int, after_ns: int) -> None:
    assert before_ns <= span["start_ns"] < span["end_ns"] <= after_ns
    assert span["duration_ms"] == pytest.approx((span["end_ns"] - span["start_ns"]) / 1e6, abs=0.01)
    assert span["duration_ms"] > 0
    assert 0 <= span["overhead_ms"] < span["duration_ms"]
    assert 0 < span["upstream_ms"] <= span["duration_ms"]
    assert span["retries"] == 0


def test_plain_chat_span_row_fills_every_column(gateway: GatewayThread) -> None:
    with client_for(gateway.url("task-1", "a1")) as client:
        before = time.time_ns()
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, temperature=0.2, max_tokens=50, seed=7
        )
        reply = raw.parse()
        after = time.time_ns()

    (span,) = gateway.spans()
    assert set(span) >= SPAN_COLUMNS
    assert HEX16.match(span["span_id"])
    assert HEX32.match(span["trace_id"])
    assert span["parent_span_id"] is None
    assert (span["rollout_id"], span["attempt_id"], span["seq"]) == ("task-1", "a1", 1)
    assert span["name"] == "chat gpt-test"
    assert span["operation"] == "chat"
    assert span["provider"] == "openai"
    assert span["deployment"] == f"openai/{UPSTREAM_MODEL}"
    assert span["model_group"] == "gpt-test"
    assert span["request_model"] == "gpt-test"
    assert span["response_model"] == UPSTREAM_MODEL == reply.model
    assert span["response_id"] == reply.id
    assert span["status"] == "ok"
    assert span["http_status"] == 200
    assert span["error_type"] is None
    assert span["error_message"] is None
    assert span["stream"] == 0
    assert_timings(span, before, after)
    assert span["ttft_ms"] is None
    assert reply.usage is not None
    assert span["input_tokens"] == reply.usage.prompt_tokens
    assert span["output_tokens"] == reply.usage.completion_tokens
    assert span["cached_tokens"] == 0
    assert span["reasoning_tokens"] == 0
    assert span["finish_reasons"] == ["stop"]
    assert span["tool_calls"] is None
    assert span["request_body"] == json.loads(raw.http_request.content)
    assert span["response_body"] == json.loads(raw.content)
    assert span["attributes"]["gen_ai.request.temperature"] == 0.2
    assert span["attributes"]["gen_ai.request.max_tokens"] == 50
    assert span["attributes"]["gen_ai.request.seed"] == 7
    assert span["tags"] == []


def test_streamed_chat_span_row_fills_every_column(gateway: GatewayThread) -> None:
    with client_for(gateway.url("task-2", "a1")) as client:
        before = time.time_ns()
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=MESSAGES, stream=True
        ) as response:
            sent = json.loads(response.http_request.content)
            chunks = list(response.parse())
        after = time.time_ns()

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (span,) = gateway.spans()
    assert set(span) >= SPAN_COLUMNS
    assert HEX16.match(span["span_id"])
    assert HEX32.match(span["trace_id"])
    assert (span["rollout_id"], span["attempt_id"], span["seq"]) == ("task-2", "a1", 1)
    assert span["name"] == "chat gpt-test"
    assert span["stream"] == 1
    assert span["status"] == "ok"
    assert span["http_status"] == 200
    assert span["response_id"] == chunks[0].id
    assert span["response_model"] == UPSTREAM_MODEL
    assert_timings(span, before, after)
    assert span["ttft_ms"] is not None
    assert 0 < span["ttft_ms"] <= span["duration_ms"]
    assert span["input_tokens"] > 0
    assert span["output_tokens"] == len(text.split())
    assert span["finish_reasons"] == ["stop"]
    assert span["request_body"] == sent
    assert span["response_body"]["object"] == "chat.completion"
    assert span["response_body"]["choices"][0]["message"]["content"] == text
    assert span["response_body"]["usage"]["completion_tokens"] == span["output_tokens"]


@pytest.mark.parametrize(
    ("operation", "resource", "arguments"),
    [
        ("text_completion", "completions", {"prompt": "hi there"}),
        ("embeddings", "embeddings", {"input": "hi there"}),
        ("responses", "responses", {"input": "hi there"}),
    ],
)
def test_each_operation_is_named_after_itself_and_its_model(
    gateway: GatewayThread, operation: str, resource: str, arguments: dict[str, Any]
) -> None:
    with client_for(gateway.url("ops", "1")) as client:
        raw = getattr(client, resource).with_raw_response.create(model="gpt-test", **arguments)
        raw.parse()

    (span,) = gateway.spans()
    assert span["operation"] == operation
    assert span["name"] == f"{operation} gpt-test"
    assert span["status"] == "ok"
    assert span["http_status"] == 200
    assert span["input_tokens"] is not None
    assert span["input_tokens"] > 0
    assert span["request_body"] == json.loads(raw.http_request.content)
    assert span["response_body"] == json.loads(raw.content)


def test_response_headers_point_at_the_recorded_span(gateway: GatewayThread) -> None:
    with client_for(gateway.url("hdr", "att")) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
        raw.parse()
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=MESSAGES, stream=True
        ) as streamed:
            list(streamed.parse())

    spans = gateway.spans(rollout_id="hdr")
    assert len(spans) == 2
    for headers, span in zip((raw.headers, streamed.headers), spans, strict=True):
        assert headers["X-Span-Id"] == span["span_id"]
        assert headers["X-Trace-Id"] == span["trace_id"]
        assert headers["X-Rollout-Id"] == "hdr"
        assert headers["X-Attempt-Id"] == "att"
        overhead = float(headers["X-Gateway-Overhead-Ms"])
        assert 0 <= overhead <= span["duration_ms"]
        assert headers["X-Upstream-Retries"] == "0"
    assert spans[0]["span_id"] != spans[1]["span_id"]


def test_cost_is_computed_from_the_configured_prices(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6}
    gateway = make_gateway(**settings_dict(fake_provider.url, **prices))
    with client_for(gateway.url("cost", "1")) as client:
        reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert reply.usage is not None
    (span,) = gateway.spans()
    expected = reply.usage.prompt_tokens * 1e-6 + reply.usage.completion_tokens * 4e-6
    assert span["cost_usd"] == pytest.approx(expected)


def test_bodies_are_not_stored_when_store_bodies_is_off(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(recorder={"store_bodies": False})
    with client_for(gateway.url("nobody", "1")) as client:
        reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    (span,) = gateway.spans()
    assert span["request_body"] is None
    assert span["response_body"] is None
    assert span["response_id"] == reply.id
    assert reply.usage is not None
    assert span["input_tokens"] == reply.usage.prompt_tokens


def test_no_key_is_ever_stored_in_any_row(
    gateway: GatewayThread, fake_provider: FakeProviderThread, db_path: Path
) -> None:
    headers = {"X-Rollout-Id": "keys", "X-Meta-Note": "routine"}
    with openai.OpenAI(
        base_url=gateway.url(), api_key=CLIENT_KEY, max_retries=0, default_headers=headers
    ) as client:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        list(client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True))
        client.completions.create(model="gpt-test", prompt="x")
        client.embeddings.create(model="gpt-test", input="x")
        client.responses.create(model="gpt-test", input="x")
        list(client.responses.create(model="gpt-test", input="x", stream=True))
        fake_provider.state.add_fault(status=401, message="Incorrect API key provided.")
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    gateway.flush()

    stored = [
        *read_rows(db_path, "select * from spans"),
        *read_rows(db_path, "select * from rollouts"),
        *read_rows(db_path, "select * from attempts"),
    ]
    assert len(read_rows(db_path, "select * from spans")) == 7
    text = json.dumps(stored, default=str)
    assert UPSTREAM_KEY not in text
    assert CLIENT_KEY not in text
    assert "Bearer" not in text


@pytest.fixture
def restarted(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> Callable[[], GatewayThread]:
    """A new gateway on the test's database each call; the fixture stops any still running."""
    return lambda: make_gateway(settings=parse_settings(settings_dict(fake_provider.url), env={}))


def test_spans_survive_a_restart(restarted: Callable[[], GatewayThread], db_path: Path) -> None:
    first = restarted()
    with client_for(first.url("durable", "1")) as client:
        ids = [
            client.chat.completions.create(model="gpt-test", messages=MESSAGES).id for _ in "abc"
        ]
    first.flush()
    before = read_spans(db_path, rollout_id="durable")
    first.stop()

    second = restarted()
    after = second.spans(rollout_id="durable")
    assert [s["response_id"] for s in after] == ids
    assert after == before


def test_stopping_the_gateway_writes_every_answered_call(
    restarted: Callable[[], GatewayThread], db_path: Path
) -> None:
    gateway = restarted()
    with client_for(gateway.url("drain", "1")) as client:
        ids = [
            client.chat.completions.create(model="gpt-test", messages=MESSAGES).id
            for _ in range(30)
        ]
    # No flush: shutdown itself must drain what was answered.
    gateway.stop()

    spans = read_spans(db_path, rollout_id="drain")
    assert [s["response_id"] for s in spans] == ids
    assert [s["seq"] for s in spans] == list(range(1, 31))


def test_two_hundred_concurrent_calls_land_as_two_hundred_spans_with_unique_seq(
    gateway: GatewayThread, db_path: Path
) -> None:
    count = 200
    with client_for(gateway.url("load", "1")) as client:

        def one(index: int) -> str:
            messages = [{"role": "user", "content": f"call {index}"}]
            reply = client.chat.completions.create(model="gpt-test", messages=messages)
            assert reply.choices[0].message.content == f"echo: call {index}"
            return reply.id

        with ThreadPoolExecutor(max_workers=16) as pool:
            ids = list(pool.map(one, range(count)))

    spans = gateway.spans(rollout_id="load")
    assert len(spans) == count
    assert [s["seq"] for s in spans] == list(range(1, count + 1))
    assert {s["response_id"] for s in spans} == set(ids)
    assert all(s["status"] == "ok" for s in spans)
    assert len({s["span_id"] for s in spans}) == count
    (attempt,) = read_rows(db_path, "select id, number from attempts where rollout_id = 'load'")
    assert attempt == {"id": "1", "number": 1}
