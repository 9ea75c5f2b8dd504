"""Who a call belongs to: rollout, attempt, agent, tags, metadata, trace, and call order.

Attribution comes from the path prefix or from headers; rollouts and attempts appear in the
database the first time a call names them, and every call in a rollout gets the next
sequence number, also across a gateway restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, read_rows, read_spans

from config.loader import parse_settings
from config.models import Settings

MESSAGES = [{"role": "user", "content": "hello"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def settings_for(provider_url: str) -> Settings:
    return parse_settings(
        {
            "models": [
                {
                    "name": "gpt-test",
                    "deployments": [
                        {
                            "provider": "openai",
                            "model": "upstream-model",
                            "api_base": provider_url,
                            "api_key": "sk-upstream-secret",
                        }
                    ],
                }
            ]
        },
        env={},
    )


@pytest.fixture
def restarted(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> Callable[[], GatewayThread]:
    """A new gateway on the test's database each call; the fixture stops any still running."""
    return lambda: make_gateway(settings=settings_for(fake_provider.url))


def chat(base_url: str, **kwargs: Any) -> Any:
    """One chat call with the raw response kept, so headers can be read."""
    with openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, **kwargs
        )
        reply = raw.parse()
    return raw, reply


def test_path_prefix_attributes_the_call_and_echoes_the_ids_in_headers(
    gateway: GatewayThread,
) -> None:
    raw, reply = chat(gateway.url("task-42", "try-1"))

    assert raw.headers["X-Rollout-Id"] == "task-42"
    assert raw.headers["X-Attempt-Id"] == "try-1"
    (span,) = gateway.spans()
    assert (span["rollout_id"], span["attempt_id"], span["seq"]) == ("task-42", "try-1", 1)
    assert span["response_id"] == reply.id


def test_headers_attribute_a_plain_v1_call_with_agent_tags_and_metadata(
    gateway: GatewayThread, db_path: Path
) -> None:
    headers = {
        "X-Rollout-Id": "task-h",
        "X-Attempt-Id": "a1",
        "X-Agent-Id": "agent-7",
        "X-Tags": "a, b",
        "X-Meta-User": "alice",
        "X-Meta-Run": "nightly",
    }
    with openai.OpenAI(
        base_url=gateway.url(), api_key="anything", max_retries=0, default_headers=headers
    ) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
        raw.parse()
        streamed = list(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        )

    assert streamed
    assert raw.headers["X-Rollout-Id"] == "task-h"
    assert raw.headers["X-Attempt-Id"] == "a1"
    spans = gateway.spans(rollout_id="task-h")
    assert [(s["attempt_id"], s["seq"], s["stream"]) for s in spans] == [("a1", 1, 0), ("a1", 2, 1)]
    for span in spans:
        assert span["tags"] == ["a", "b"]
        assert span["attributes"]["gen_ai.agent.id"] == "agent-7"
        assert span["attributes"]["metadata"] == {"user": "alice", "run": "nightly"}
    (rollout,) = read_rows(db_path, "select * from rollouts")
    assert rollout["id"] == "task-h"
    assert rollout["agent"] == "agent-7"
    assert json.loads(rollout["tags"]) == ["a", "b"]
    assert json.loads(rollout["metadata"]) == {"user": "alice", "run": "nightly"}


def test_extra_headers_on_one_call_attribute_only_that_call(gateway: GatewayThread) -> None:
    with openai.OpenAI(base_url=gateway.url(), api_key="anything", max_retries=0) as client:
        client.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            extra_headers={"X-Rollout-Id": "one-off", "X-Attempt-Id": "7"},
        )
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    spans = gateway.spans()
    assert sorted((s["rollout_id"] or "", s["attempt_id"] or "") for s in spans) == [
        ("", ""),
        ("one-off", "7"),
    ]


def test_traceparent_makes_the_span_join_the_callers_trace(gateway: GatewayThread) -> None:
    raw, _ = chat(
        gateway.url("traced", "1"),
        extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"},
    )

    assert raw.headers["X-Trace-Id"] == TRACE_ID
    (span,) = gateway.spans()
    assert span["trace_id"] == TRACE_ID
    assert span["parent_span_id"] == PARENT_SPAN_ID
    assert span["span_id"] == raw.headers["X-Span-Id"]
    assert span["span_id"] != PARENT_SPAN_ID


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"00-{'0' * 32}-{PARENT_SPAN_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
    ],
)
def test_invalid_traceparent_starts_a_fresh_trace(gateway: GatewayThread, traceparent: str) -> None:
    raw, _ = chat(gateway.url("traced", "1"), extra_headers={"traceparent": traceparent})

    (span,) = gateway.spans()
    assert len(span["trace_id"]) == 32
    assert span["trace_id"] not in (TRACE_ID, "0" * 32)
    assert span["parent_span_id"] is None
    assert raw.headers["X-Trace-Id"] == span["trace_id"]


def test_calls_of_a_rollout_without_traceparent_share_one_trace(gateway: GatewayThread) -> None:
    chat(gateway.url("t", "1"))
    chat(gateway.url("t", "2"))
    chat(gateway.url("other", "1"))

    first, second = gateway.spans(rollout_id="t")
    (other,) = gateway.spans(rollout_id="other")
    assert first["trace_id"] == second["trace_id"] != other["trace_id"]
    assert first["parent_span_id"] is None


def test_calls_without_rollout_or_traceparent_each_get_their_own_trace(
    gateway: GatewayThread,
) -> None:
    chat(gateway.url())
    chat(gateway.url())

    first, second = gateway.spans()
    assert first["trace_id"] != second["trace_id"]


def test_rollouts_and_attempts_are_created_on_first_sight(
    gateway: GatewayThread, db_path: Path
) -> None:
    chat(gateway.url("task-9", "first"))
    chat(gateway.url("task-9", "first"))
    chat(gateway.url("task-9", "second"))
    gateway.flush()

    (rollout,) = read_rows(db_path, "select * from rollouts")
    assert rollout["id"] == "task-9"
    assert rollout["status"] == "running"
    assert rollout["ended_ns"] is None
    assert rollout["created_ns"] <= rollout["updated_ns"]
    attempts = read_rows(db_path, "select * from attempts order by number")
    assert [(a["rollout_id"], a["id"], a["number"], a["status"]) for a in attempts] == [
        ("task-9", "first", 1, "running"),
        ("task-9", "second", 2, "running"),
    ]
    spans = gateway.spans(rollout_id="task-9")
    assert [(s["attempt_id"], s["seq"]) for s in spans] == [
        ("first", 1),
        ("first", 2),
        ("second", 3),
    ]


def test_rollout_prefix_without_attempt_gets_attempt_one(
    gateway: GatewayThread, db_path: Path
) -> None:
    raw, _ = chat(gateway.url("auto"))

    assert raw.headers["X-Attempt-Id"] == "1"
    (span,) = gateway.spans(rollout_id="auto")
    assert span["attempt_id"] == "1"
    attempts = read_rows(db_path, "select rollout_id, id, number from attempts")
    assert attempts == [{"rollout_id": "auto", "id": "1", "number": 1}]


def test_rollout_header_without_attempt_gets_attempt_one(gateway: GatewayThread) -> None:
    raw, _ = chat(gateway.url(), extra_headers={"X-Rollout-Id": "auto-h"})

    assert raw.headers["X-Rollout-Id"] == "auto-h"
    assert raw.headers["X-Attempt-Id"] == "1"
    (span,) = gateway.spans(rollout_id="auto-h")
    assert span["attempt_id"] == "1"


def test_sequence_numbers_follow_call_order_separately_per_rollout(
    gateway: GatewayThread,
) -> None:
    order = ["ra", "rb", "ra", "ra", "rb"]
    ids: dict[str, list[str]] = {"ra": [], "rb": []}
    for rollout in order:
        _, reply = chat(gateway.url(rollout, "1"))
        ids[rollout].append(reply.id)

    for rollout, expected_ids in ids.items():
        spans = gateway.spans(rollout_id=rollout)
        assert [s["seq"] for s in spans] == list(range(1, len(expected_ids) + 1))
        assert [s["response_id"] for s in spans] == expected_ids


def test_sequence_numbers_keep_rising_after_a_gateway_restart(
    restarted: Callable[[], GatewayThread], db_path: Path
) -> None:
    first = restarted()
    chat(first.url("long", "1"))
    chat(first.url("long", "1"))
    chat(first.url("other", "1"))
    first.flush()
    first.stop()

    second = restarted()
    _, reply = chat(second.url("long", "1"))
    chat(second.url("long"))
    chat(second.url("fresh", "1"))
    second.flush()

    long_spans = read_spans(db_path, rollout_id="long")
    assert [s["seq"] for s in long_spans] == [1, 2, 3, 4]
    assert long_spans[2]["response_id"] == reply.id
    # An attempt-less call after the restart joins the rollout's latest attempt.
    assert long_spans[3]["attempt_id"] == "1"
    assert [s["seq"] for s in read_spans(db_path, rollout_id="fresh")] == [1]
    assert [s["seq"] for s in read_spans(db_path, rollout_id="other")] == [1]


def test_unattributed_call_is_recorded_without_a_rollout(
    gateway: GatewayThread, db_path: Path
) -> None:
    raw, reply = chat(gateway.url())

    assert "X-Rollout-Id" not in raw.headers
    assert "X-Attempt-Id" not in raw.headers
    (span,) = gateway.spans()
    assert span["rollout_id"] is None
    assert span["attempt_id"] is None
    assert span["seq"] is None
    assert span["response_id"] == reply.id
    assert span["status"] == "ok"
    assert read_rows(db_path, "select * from rollouts") == []
    assert read_rows(db_path, "select * from attempts") == []


def test_require_rollout_answers_400_in_openai_shape_to_unattributed_calls(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(require_rollout=True)
    with openai.OpenAI(base_url=gateway.url(), api_key="anything", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="gpt-test", input="x")
        assert fake_provider.state.snapshot() == []
        # Naming the rollout by header or by path makes the same call go through.
        by_header = client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, extra_headers={"X-Rollout-Id": "named"}
        )
    _, by_path = chat(gateway.url("named", "1"))

    error = caught.value
    assert error.status_code == 400
    assert error.code == "rollout_required"
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "rollout_required"
    assert "rollout" in body["error"]["message"]
    assert by_header.choices[0].message.content == "echo: hello"
    assert by_path.choices[0].message.content == "echo: hello"
    assert [s["seq"] for s in gateway.spans(rollout_id="named")] == [1, 2]
    assert [s for s in gateway.spans() if s["rollout_id"] is None and s["status"] == "ok"] == []


def test_attempt_header_without_a_rollout_is_a_400(gateway: GatewayThread) -> None:
    with openai.OpenAI(base_url=gateway.url(), api_key="anything", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, extra_headers={"X-Attempt-Id": "3"}
            )
        # The gateway is still fine afterwards.
        reply = client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert reply.choices[0].message.content == "echo: hello"


@pytest.mark.parametrize("bad", ["has space", "a/b", "x" * 300])
def test_invalid_rollout_ids_are_rejected_with_a_400(gateway: GatewayThread, bad: str) -> None:
    with httpx.Client(timeout=10) as http:
        response = http.post(
            f"{gateway.url()}/chat/completions",
            json={"model": "gpt-test", "messages": MESSAGES},
            headers={"X-Rollout-Id": bad},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
