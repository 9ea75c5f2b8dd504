"""How the stream assemblers fold events into the recorded answer, and how each stream says
it failed: chat error chunks, Responses `error`, `response.failed`, a stream cut short."""

from __future__ import annotations

from typing import Any

from gateway.proxy.spans import reply_fields
from gateway.proxy.streaming import ChatAssembler, ResponsesAssembler


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_streamed_custom_and_function_tool_calls_are_assembled_whole() -> None:
    assembler = ChatAssembler()
    for delta in (
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "custom",
                    "custom": {"name": "sql", "input": ""},
                }
            ],
        },
        {"tool_calls": [{"index": 0, "custom": {"input": "SELECT "}}]},
        {"tool_calls": [{"index": 0, "custom": {"input": "1"}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a"'},
                }
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": ":1}"}}]},
    ):
        assembler.add(chat_chunk(delta))
    assembler.add(chat_chunk({}, "tool_calls"))
    result = assembler.result()
    custom, function = result["choices"][0]["message"]["tool_calls"]
    assert custom == {
        "id": "call_a",
        "type": "custom",
        "custom": {"name": "sql", "input": "SELECT 1"},
    }
    assert function == {
        "id": "call_b",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a":1}'},
    }
    assert reply_fields("chat", result)["tool_calls"] == [
        {"id": "call_a", "type": "custom", "name": "sql", "arguments": "SELECT 1"},
        {"id": "call_b", "type": "function", "name": "f", "arguments": '{"a":1}'},
    ]
    assert assembler.failure() is None


def test_a_tool_call_name_sent_first_as_a_number_does_not_break_the_assembly() -> None:
    assembler = ChatAssembler()
    for delta in (
        {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": 5}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "lookup", "arguments": "{}"}}]},
    ):
        assembler.add(chat_chunk(delta))
    [call] = assembler.result()["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": "{}"}


def test_a_chat_error_chunk_is_the_streams_failure() -> None:
    assembler = ChatAssembler()
    assembler.add(chat_chunk({"content": "half"}))
    assembler.add({"error": {"message": "overloaded", "type": "server_error"}})
    assert assembler.failure() == ("server_error", "overloaded")


def responses_events(*tail: dict[str, Any]) -> ResponsesAssembler:
    assembler = ResponsesAssembler()
    started = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    assembler.add({"type": "response.created", "response": started})
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {}}
    assembler.add({"type": "response.output_item.done", "output_index": 0, "item": item})
    for event in tail:
        assembler.add(event)
    return assembler


def test_a_completed_responses_stream_has_no_failure() -> None:
    final = {"id": "resp_1", "status": "completed", "output": [{"type": "future_item", "x": 1}]}
    assembler = responses_events({"type": "response.completed", "response": final})
    assert assembler.failure() is None
    # The final object is kept as the upstream sent it, unknown items included.
    assert assembler.result() == final


def test_responses_error_events_flat_and_nested() -> None:
    flat = responses_events({"type": "error", "code": "rate_limit_exceeded", "message": "slow"})
    assert flat.failure() == ("rate_limit_exceeded", "slow")
    nested = responses_events({"type": "error", "error": {"type": "server_error", "message": "x"}})
    assert nested.failure() == ("server_error", "x")
    result = flat.result()
    assert result["status"] == "failed"
    assert result["output"][0]["id"] == "ws_1"


def test_response_failed_and_incomplete() -> None:
    failed = {"status": "failed", "error": {"code": "server_error", "message": "boom"}}
    assert responses_events({"type": "response.failed", "response": failed}).failure() == (
        "server_error",
        "boom",
    )
    incomplete = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assembler = responses_events({"type": "response.incomplete", "response": incomplete})
    assert assembler.failure() is None
    assert reply_fields("responses", assembler.result())["finish_reasons"] == ["max_output_tokens"]


def test_a_responses_stream_without_its_final_event_failed_and_keeps_its_items() -> None:
    assembler = responses_events()
    assert assembler.failure() == (
        "upstream_stream_incomplete",
        "the upstream's Responses stream ended before its terminal event",
    )
    result = assembler.result()
    assert [item["id"] for item in result["output"]] == ["ws_1"]
    # Not finished, so no finish reason is claimed for it.
    assert reply_fields("responses", result)["finish_reasons"] is None
