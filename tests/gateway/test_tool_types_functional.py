"""Every tool type is understood: function, custom (free-form) and the built-in Responses tool
items, asked for and answered, plain and streamed; ids reused across turns still find their
call; item types invented after this gateway are kept whole. Through the real `openai` SDK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread

WEATHER = {"name": "get_weather", "arguments": '{"city":"Paris"}'}


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="anything", max_retries=0)


def calls_and_tools(spans: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ...]:
    model_calls = [s for s in spans if s["operation"] != "execute_tool"]
    tools = [s for s in spans if s["operation"] == "execute_tool"]
    return model_calls, tools


# -- chat: custom tools ------------------------------------------------------------------------

CUSTOM_CALL = {
    "id": "call_sql",
    "type": "custom",
    "custom": {"name": "run_sql", "input": "SELECT * FROM t WHERE x = 'a b'"},
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_chat_custom_tool_call_and_its_result_are_recorded(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread, stream: bool
) -> None:
    rollout = f"custom-{stream}"
    fake_provider.state.add_fault(tool_calls=[CUSTOM_CALL])
    messages: list[Any] = [{"role": "user", "content": "count the rows"}]
    with client_for(module_gateway.url(rollout, "1")) as client:
        if stream:
            chunks = list(
                client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
            )
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert any(d.tool_calls for d in deltas)
        else:
            answer = client.chat.completions.create(model="gpt-test", messages=messages)
            (call,) = answer.choices[0].message.tool_calls or []
            assert call.type == "custom" and call.custom.input == CUSTOM_CALL["custom"]["input"]  # type: ignore[union-attr]
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]},
            {"role": "tool", "tool_call_id": "call_sql", "content": "3 rows"},
        ]
        client.chat.completions.create(model="gpt-test", messages=messages)
    asked, tool, final = module_gateway.spans(rollout_id=rollout)
    assert asked["tool_calls"] == [
        {
            "id": "call_sql",
            "type": "custom",
            "name": "run_sql",
            "arguments": "SELECT * FROM t WHERE x = 'a b'",
        }
    ]
    if stream:
        # The assembled answer has the custom call whole, as a plain answer would.
        (whole,) = asked["response_body"]["choices"][0]["message"]["tool_calls"]
        assert whole["type"] == "custom" and whole["custom"] == CUSTOM_CALL["custom"]
    assert tool["name"] == "execute_tool run_sql"
    assert tool["parent_span_id"] == asked["span_id"]
    assert tool["status"] == "ok"
    assert tool["response_body"]["content"] == "3 rows"
    assert tool["tool_calls"][0]["arguments"] == "SELECT * FROM t WHERE x = 'a b'"
    assert final["seq"] == tool["seq"] + 1


# -- Responses: every built-in item -------------------------------------------------------------

ASKED: list[dict[str, Any]] = [
    {"type": "function_call", "id": "fc_1", "call_id": "call_fn", "status": "completed", **WEATHER},
    {
        "type": "custom_tool_call",
        "id": "ctc_1",
        "call_id": "call_custom",
        "name": "patch_notes",
        "input": "free text\nwith lines",
    },
    {
        "type": "shell_call",
        "id": "sh_1",
        "call_id": "call_shell",
        "status": "completed",
        "action": {"commands": ["pytest -q"], "timeout_ms": 60000},
    },
    {
        "type": "local_shell_call",
        "id": "ls_1",
        "call_id": "call_local",
        "status": "completed",
        "action": {"type": "exec", "command": ["ls", "-la"], "env": {}},
    },
    {
        "type": "apply_patch_call",
        "id": "ap_1",
        "call_id": "call_patch",
        "status": "completed",
        "operation": {"type": "update_file", "path": "a.py", "diff": "@@ -1 +1 @@\n-a\n+b"},
    },
    {
        "type": "computer_call",
        "id": "cu_1",
        "call_id": "call_computer",
        "status": "completed",
        "pending_safety_checks": [],
        "action": {"type": "click", "button": "left", "x": 10, "y": 20},
    },
    # An item type invented after this gateway was written, that asks for a tool.
    {
        "type": "hologram_call",
        "id": "ho_1",
        "call_id": "call_holo",
        "status": "completed",
        "projection": {"shape": "cube"},
    },
]
HOSTED: list[dict[str, Any]] = [
    {
        "type": "web_search_call",
        "id": "ws_1",
        "status": "completed",
        "action": {"type": "search", "query": "weather paris"},
    },
    {
        "type": "file_search_call",
        "id": "fs_1",
        "status": "failed",
        "queries": ["q3 report"],
        "results": None,
    },
    {
        "type": "mcp_call",
        "id": "mcp_1",
        "name": "create_issue",
        "server_label": "github",
        "arguments": '{"title":"x"}',
        "status": "failed",
        "error": "403: token lacks scope",
        "output": None,
    },
    {
        "type": "code_interpreter_call",
        "id": "ci_1",
        "status": "completed",
        "container_id": "c1",
        "code": "print(1+1)",
        "outputs": [{"type": "logs", "logs": "2\n"}],
    },
    {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "aGVsbG8="},
    # Not a tool call, and of a type no SDK knows yet: kept, never read as a call.
    {"type": "telepathy", "id": "tp_1", "thought": "kept whole"},
]
ANSWERS: list[dict[str, Any]] = [
    {"type": "function_call_output", "call_id": "call_fn", "output": "Error: city not found"},
    {"type": "custom_tool_call_output", "call_id": "call_custom", "output": "noted"},
    {
        "type": "shell_call_output",
        "call_id": "call_shell",
        "output": [
            {"stdout": "1 failed", "stderr": "", "outcome": {"type": "exit", "exit_code": 1}}
        ],
    },
    {
        "type": "local_shell_call_output",
        "id": "call_local",
        "output": '{"output": "a.py", "metadata": {"exit_code": 0}}',
    },
    {
        "type": "apply_patch_call_output",
        "call_id": "call_patch",
        "status": "failed",
        "output": "hunk did not apply",
    },
    {
        "type": "computer_call_output",
        "call_id": "call_computer",
        "output": {
            "type": "computer_screenshot",
            "image_url": "data:image/png;base64," + "A" * 5000,
        },
    },
    {"type": "hologram_call_output", "call_id": "call_holo", "output": "projected"},
    # An input item type no SDK knows yet: forwarded and stored as it is.
    {"type": "telepathy_note", "note": "kept whole too"},
]
EXPECTED_CALLS = [
    ("call_fn", "function_call", "get_weather", '{"city":"Paris"}'),
    ("call_custom", "custom_tool_call", "patch_notes", "free text\nwith lines"),
    ("call_shell", "shell_call", "shell", '{"commands":["pytest -q"],"timeout_ms":60000}'),
    (
        "call_local",
        "local_shell_call",
        "local_shell",
        '{"type":"exec","command":["ls","-la"],"env":{}}',
    ),
    (
        "call_patch",
        "apply_patch_call",
        "apply_patch",
        '{"type":"update_file","path":"a.py","diff":"@@ -1 +1 @@\\n-a\\n+b"}',
    ),
    (
        "call_computer",
        "computer_call",
        "computer",
        '{"type":"click","button":"left","x":10,"y":20}',
    ),
    ("call_holo", "hologram_call", "hologram", '{"projection":{"shape":"cube"}}'),
    ("ws_1", "web_search_call", "web_search", '{"type":"search","query":"weather paris"}'),
    ("fs_1", "file_search_call", "file_search", '["q3 report"]'),
    ("mcp_1", "mcp_call", "create_issue", '{"title":"x"}'),
    ("ci_1", "code_interpreter_call", "code_interpreter", "print(1+1)"),
    ("ig_1", "image_generation_call", "image_generation", ""),
]
# The provider ran these within the answer: recorded with it, from the items' own status.
EXPECTED_HOSTED = {
    "web_search": ("ok", "completed"),
    "file_search": ("error", ""),
    "create_issue": ("error", "403: token lacks scope"),
    "code_interpreter": ("ok", "2\n"),
    "image_generation": ("ok", "an image"),
}
# The client ran these and sent the results back in the next request.
EXPECTED_RESULTS = {
    "get_weather": "error",  # begins with "Error:"
    "patch_notes": "ok",
    "shell": "error",  # exit code 1
    "local_shell": "ok",  # exit code 0
    "apply_patch": "error",  # status failed
    "computer": "ok",
    "hologram": "ok",
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_every_responses_tool_item_is_recorded_with_its_name_input_and_result(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread, stream: bool
) -> None:
    rollout = f"items-{stream}"
    fake_provider.state.add_fault(output_items=ASKED + HOSTED)
    given: list[Any] = [{"role": "user", "content": "do everything"}]
    with client_for(module_gateway.url(rollout, "1")) as client:
        if stream:
            events = list(client.responses.create(model="gpt-test", input=given, stream=True))
            assert events[-1].type == "response.completed"
        else:
            client.responses.create(model="gpt-test", input=given)
        client.responses.create(model="gpt-test", input=given + ASKED + HOSTED + ANSWERS)

    spans = module_gateway.spans(rollout_id=rollout)
    (asked, final), tools = calls_and_tools(spans)
    recorded = [(c["id"], c["type"], c["name"], c["arguments"]) for c in asked["tool_calls"]]
    assert recorded == EXPECTED_CALLS
    # Unknown items are kept whole in what is stored, in and out.
    assert {"type": "telepathy", "id": "tp_1", "thought": "kept whole"} in asked["response_body"][
        "output"
    ]
    assert {"type": "telepathy_note", "note": "kept whole too"} in final["request_body"]["input"]
    assert asked["status"] == final["status"] == "ok"

    hosted = tools[: len(EXPECTED_HOSTED)]
    assert [t["seq"] for t in hosted] == list(range(asked["seq"] + 1, asked["seq"] + 6))
    for tool in hosted:
        name = tool["name"].removeprefix("execute_tool ")
        status, content = EXPECTED_HOSTED[name]
        assert (tool["status"], tool["response_body"]["content"]) == (status, content), name
        assert tool["parent_span_id"] == asked["span_id"]
    sent_back = tools[len(EXPECTED_HOSTED) :]
    assert {t["name"].removeprefix("execute_tool "): t["status"] for t in sent_back} == (
        EXPECTED_RESULTS
    )
    assert all(t["seq"] < final["seq"] for t in sent_back)
    shell = next(t for t in sent_back if t["name"] == "execute_tool shell")
    assert shell["response_body"]["content"] == "1 failed"
    assert shell["tool_calls"][0]["arguments"] == '{"commands":["pytest -q"],"timeout_ms":60000}'
    computer = next(t for t in sent_back if t["name"] == "execute_tool computer")
    # A screenshot's data URL is cut in the summary, not stored whole as "the result".
    assert len(computer["response_body"]["content"]) < 2_500


# -- reused ids --------------------------------------------------------------------------------

TURNS = [
    ("get_weather", '{"city":"Paris"}', "18C, sunny"),
    ("get_time", '{"tz":"CET"}', "12:00"),
    ("lookup", '{"q":"Eiffel tower"}', "330 m"),
]


def _chat_turn(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


def _responses_turn(name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{name}",
        "call_id": "call_0",
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


@pytest.mark.parametrize("route", ["chat", "responses"])
def test_results_find_their_call_when_every_turn_reuses_the_same_id(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread, route: str
) -> None:
    rollout = f"reused-{route}"
    conversation: list[Any] = [{"role": "user", "content": "plan my day in Paris"}]
    with client_for(module_gateway.url(rollout, "1")) as client:
        for name, arguments, result in TURNS:
            if route == "chat":
                fake_provider.state.add_fault(tool_calls=[_chat_turn(name, arguments)])
                client.chat.completions.create(model="gpt-test", messages=conversation)
                conversation += [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [_chat_turn(name, arguments)],
                    },
                    {"role": "tool", "tool_call_id": "call_0", "content": result},
                ]
            else:
                fake_provider.state.add_fault(output_items=[_responses_turn(name, arguments)])
                client.responses.create(model="gpt-test", input=conversation)
                conversation += [
                    _responses_turn(name, arguments),
                    {"type": "function_call_output", "call_id": "call_0", "output": result},
                ]
        # The last request carries all three results, each with id call_0.
        if route == "chat":
            client.chat.completions.create(model="gpt-test", messages=conversation)
        else:
            client.responses.create(model="gpt-test", input=conversation)

    spans = module_gateway.spans(rollout_id=rollout)
    assert [s["operation"] == "execute_tool" for s in spans] == [False, True] * 3 + [False]
    for turn, (name, arguments, result) in enumerate(TURNS):
        asked, tool = spans[2 * turn], spans[2 * turn + 1]
        assert asked["tool_calls"][0]["name"] == name
        assert tool["name"] == f"execute_tool {name}"
        assert tool["parent_span_id"] == asked["span_id"]
        assert tool["tool_calls"][0] == {
            "id": "call_0",
            "type": "function" if route == "chat" else "function_call",
            "name": name,
            "arguments": arguments,
        }
        assert tool["response_body"]["content"] == result


def test_a_resent_result_of_an_earlier_turn_is_not_recorded_again(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    """The same call asked twice (same id, tool and arguments): each result is matched once."""
    conversation: list[Any] = [{"role": "user", "content": "weather twice"}]
    with client_for(module_gateway.url("twice", "1")) as client:
        for result in ("18C", "19C"):
            fake_provider.state.add_fault(tool_calls=[_chat_turn("get_weather", "{}")])
            client.chat.completions.create(model="gpt-test", messages=conversation)
            conversation += [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [_chat_turn("get_weather", "{}")],
                },
                {"role": "tool", "tool_call_id": "call_0", "content": result},
            ]
        client.chat.completions.create(model="gpt-test", messages=conversation)
    tools = [
        s for s in module_gateway.spans(rollout_id="twice") if s["operation"] == "execute_tool"
    ]
    assert [t["response_body"]["content"] for t in tools] == ["18C", "19C"]
    assert len({t["parent_span_id"] for t in tools}) == 2


def test_tool_spans_of_a_hosted_tool_are_stored_as_json(
    module_gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    """What `spangate show` and the API read back: a hosted tool's span is a normal tool span."""
    fake_provider.state.add_fault(output_items=[HOSTED[0]])
    with client_for(module_gateway.url("hosted-api", "1")) as client:
        client.responses.create(model="gpt-test", input="search")
    _, tool = module_gateway.spans(rollout_id="hosted-api")
    assert orjson.loads(orjson.dumps(tool["attributes"]))["spangate.tool.type"] == "web_search_call"
    assert tool["duration_ms"] == 0


def test_the_error_rule_is_set_per_tool_in_the_config(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(
        tools={
            "per_tool": {
                # A search tool whose hits often start with "Error:": never an error.
                "grep": {"error_when": "never"},
                # A test runner whose failures are in its summary line.
                "pytest": {"error_when": [r"^\d+ failed"]},
            }
        }
    )
    asked = [
        {"id": "call_a", "type": "function", "function": {"name": "grep", "arguments": "{}"}},
        {"id": "call_b", "type": "function", "function": {"name": "pytest", "arguments": "{}"}},
        {"id": "call_c", "type": "function", "function": {"name": "fetch", "arguments": "{}"}},
    ]
    results = {
        "call_a": "Error: connection refused  (src/net.py:12)",
        "call_b": "collected 9 items\n1 failed, 8 passed",
        "call_c": "Error: 503 from upstream",
    }
    fake_provider.state.add_fault(tool_calls=asked)
    messages: list[Any] = [{"role": "user", "content": "check the build"}]
    with client_for(gateway.url("rules", "1")) as client:
        client.chat.completions.create(model="gpt-test", messages=messages)
        messages.append({"role": "assistant", "content": None, "tool_calls": asked})
        messages += [{"role": "tool", "tool_call_id": i, "content": r} for i, r in results.items()]
        client.chat.completions.create(model="gpt-test", messages=messages)
    _, tools = calls_and_tools(gateway.spans(rollout_id="rules"))
    assert {t["name"]: t["status"] for t in tools} == {
        "execute_tool grep": "ok",
        "execute_tool pytest": "error",
        "execute_tool fetch": "error",
    }
