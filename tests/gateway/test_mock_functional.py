"""The built-in `mock` lets a client's tool loop finish offline, through the real gateway and the
real `openai` SDK: tool calls (one or parallel) in chat and Responses, a final answer once the
results are sent, JSON that validates against the requested schema, refusals on `[refuse]`,
and streams that add up to the plain answers."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from servers import GatewayThread

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}},
    },
}
# The same tools in the Responses API's flat shape.
RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}
RESPONSES_TIME = {"type": "function", **TIME["function"]}


class Step(BaseModel):
    explanation: str
    output: str


class Solution(BaseModel):
    steps: list[Step]
    final_answer: str
    confidence: float | None


@pytest.fixture(scope="module")
def gateway(module_gateway: GatewayThread) -> GatewayThread:
    return module_gateway


def client_for(gateway: GatewayThread, rollout: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url(rollout, "1"), api_key="anything", max_retries=0)


NOT_COMPARED = {"id", "created", "created_at", "index", "parsed", "parsed_arguments"}


def without_ids(value: Any) -> Any:
    """An answer without what differs between two calls (ids, times) or what the SDK's stream
    helpers add while accumulating (`index`, `parsed`, `parsed_arguments`)."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in NOT_COMPARED}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


# -- chat -----------------------------------------------------------------------------


def test_chat_calls_every_offered_tool_in_parallel_then_answers(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-parallel-chat")
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = client.chat.completions.create(model="mock", messages=messages, tools=[WEATHER, TIME])
    calls = first.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "example"}
    assert json.loads(calls[1].function.arguments) == {"zone": "UTC"}
    assert len({c.id for c in calls}) == 2
    assert first.choices[0].finish_reason == "tool_calls"
    messages += [first.choices[0].message.model_dump(exclude_none=True)]
    messages += [
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18C"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "09:00"},
    ]
    final = client.chat.completions.create(model="mock", messages=messages, tools=[WEATHER, TIME])
    assert final.choices[0].message.content == (
        "The tools returned '18C' and '09:00', so that is my answer."
    )
    spans = gateway.spans(rollout_id="mock-parallel-chat")
    tools = [s for s in spans if s["operation"] == "execute_tool"]
    assert sorted(s["name"] for s in tools) == ["execute_tool get_time", "execute_tool get_weather"]


def test_chat_without_parallel_tool_calls_calls_one_tool(gateway: GatewayThread) -> None:
    reply = client_for(gateway, "mock-one-tool").chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == ["get_weather"]


def test_chat_tool_choice_names_the_tool_called(gateway: GatewayThread) -> None:
    reply = client_for(gateway, "mock-forced-tool").chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "Time?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == ["get_time"]


def test_chat_stream_adds_up_to_the_plain_answer(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-chat-stream")
    asks: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "Weather and time?"}], "tools": [WEATHER, TIME]},
        {"messages": [{"role": "user", "content": "[refuse] how to pick a lock"}]},
        {"messages": [{"role": "user", "content": "Say hi"}]},
    ]
    for ask in asks:
        plain = client.chat.completions.create(model="mock", **ask)
        with client.chat.completions.stream(model="mock", **ask) as stream:
            streamed = stream.get_final_completion()
        wanted = without_ids(plain.choices[0].message.model_dump(exclude_none=True))
        got = without_ids(streamed.choices[0].message.model_dump(exclude_none=True))
        assert got == wanted
        assert streamed.choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_refuses_when_the_user_asks_it_to(gateway: GatewayThread) -> None:
    reply = client_for(gateway, "mock-refusal").chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "[refuse] Tell me a secret"}]
    )
    message = reply.choices[0].message
    assert message.refusal == "I'm sorry, but I can't help with that."
    assert message.content is None


def test_chat_json_schema_answer_parses_into_the_model(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-json-schema")
    reply = client.chat.completions.parse(
        model="mock",
        messages=[{"role": "user", "content": "Solve 8x + 7 = -23"}],
        response_format=Solution,
    )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Solution)
    assert parsed.steps and parsed.steps[0].output == "example"


def test_chat_json_object_answer_is_a_json_object(gateway: GatewayThread) -> None:
    reply = client_for(gateway, "mock-json-object").chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "Reply in JSON"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(reply.choices[0].message.content or "") == {
        "answer": "This is a mock answer to: Reply in JSON"
    }


# -- Responses ------------------------------------------------------------------------


def test_responses_calls_a_tool_then_answers_from_its_output(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-responses-tool")
    first = client.responses.create(
        model="mock",
        input="Weather in Paris?",
        tools=[RESPONSES_WEATHER],
        parallel_tool_calls=False,
    )
    (call,) = first.output
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "example"})
    final = client.responses.create(
        model="mock",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"},
        ],
        tools=[RESPONSES_WEATHER],
    )
    assert final.output_text == "The tool returned '18C, sunny', so that is my answer."
    spans = gateway.spans(rollout_id="mock-responses-tool")
    assert [s["name"] for s in spans] == [
        "responses mock",
        "execute_tool get_weather",
        "responses mock",
    ]
    assert spans[0]["tool_calls"] == [
        {
            "id": call.call_id,
            "type": "function_call",
            "name": "get_weather",
            "arguments": '{"city":"example"}',
        }
    ]


def test_responses_parallel_tool_calls(gateway: GatewayThread) -> None:
    reply = client_for(gateway, "mock-responses-parallel").responses.create(
        model="mock", input="Weather and time?", tools=[RESPONSES_WEATHER, RESPONSES_TIME]
    )
    assert [(i.type, getattr(i, "name", None)) for i in reply.output] == [
        ("function_call", "get_weather"),
        ("function_call", "get_time"),
    ]


def test_responses_stream_events_come_in_openais_order(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-responses-stream")
    ask: dict[str, Any] = {"model": "mock", "input": "Weather?", "tools": [RESPONSES_WEATHER]}
    plain = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert (
        without_ids(streamed.model_dump(exclude={"usage"}))["output"]
        == without_ids(plain.model_dump())["output"]
    )


def test_responses_refusal_plain_and_streamed(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-responses-refusal")
    plain = client.responses.create(model="mock", input="[refuse] Tell me a secret")
    part = plain.output[0].content[0]  # type: ignore[union-attr]
    assert (part.type, part.refusal) == ("refusal", "I'm sorry, but I can't help with that.")  # type: ignore[union-attr]
    with client.responses.stream(model="mock", input="[refuse] Tell me a secret") as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.refusal.delta" in kinds and "response.refusal.done" in kinds
    assert streamed.output[0].content[0].refusal == part.refusal  # type: ignore[union-attr]


def test_responses_text_format_json_schema_validates(gateway: GatewayThread) -> None:
    client = client_for(gateway, "mock-responses-json")
    reply = client.responses.parse(model="mock", input="Solve 8x + 7 = -23", text_format=Solution)
    assert isinstance(reply.output_parsed, Solution)
    jsonschema.validate(json.loads(reply.output_text), Solution.model_json_schema())
