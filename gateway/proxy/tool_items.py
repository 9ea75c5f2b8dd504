"""Every kind of tool call and tool result in Chat Completions and Responses, read one way.

A call is `{id, type, name, arguments}` (arguments as text: a function's JSON, a custom
tool's free-form input, a built-in tool's action as JSON); a result is the call id it
answers, its text, and the failed/succeeded status the item itself states, if any. Item
types this module does not know are read by their shape (`*_call` with an id, `*_output`
with a `call_id`) and otherwise left alone; the stored bodies keep them whole either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

# Longest string kept when a result or input is summarised (screenshots, base64 images).
MAX_FIELD_CHARS = 2_000

# Responses output items that ask for a tool: item type -> (tool name, the item's input key).
# `None` as the name means the item's own `name` field (function, custom and MCP tools).
CALL_ITEMS: dict[str, tuple[str | None, str | None]] = {
    "function_call": (None, "arguments"),
    "custom_tool_call": (None, "input"),
    "mcp_call": (None, "arguments"),
    "shell_call": ("shell", "action"),
    "local_shell_call": ("local_shell", "action"),
    "apply_patch_call": ("apply_patch", "operation"),
    "computer_call": ("computer", "action"),
    "web_search_call": ("web_search", "action"),
    "file_search_call": ("file_search", "queries"),
    "code_interpreter_call": ("code_interpreter", "code"),
    "image_generation_call": ("image_generation", None),
    "tool_search_call": ("tool_search", "arguments"),
    "program": ("program", "code"),
}
# Tools the provider runs inside the call: their results are in the answer itself.
HOSTED_CALLS = frozenset(
    {
        "mcp_call",
        "web_search_call",
        "file_search_call",
        "code_interpreter_call",
        "image_generation_call",
        "program",
    }
)
# Items that carry a tool's result back, matched to their call by `call_id`.
RESULT_ITEMS = frozenset(
    {
        "function_call_output",
        "custom_tool_call_output",
        "shell_call_output",
        "local_shell_call_output",
        "computer_call_output",
        "apply_patch_call_output",
        "tool_search_output",
        "program_output",
    }
)
# Fields that say what an item is rather than what the tool was given.
_META_FIELDS = frozenset({"type", "id", "call_id", "status", "name", "created_by", "caller"})


@dataclass(slots=True)
class ToolResult:
    """A tool's result as it came back: what it answers, its text, what it says of itself."""

    call_id: str
    text: str
    # True or False when the item states it (an exit code, `status: failed`, an MCP error);
    # None when only the text can tell (judged by `tools.error_when`).
    failed: bool | None = None


def as_object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def objects_in(value: Any) -> list[dict[str, Any]]:
    """The objects of a list; anything else in it (or not a list) is passed over."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _brief(value: Any) -> Any:
    """The value with long strings (data URLs, base64 images) cut, for a readable summary."""
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS] + "..."
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_brief(v) for v in value]
    return value


def text_of(content: Any) -> str:
    """A result's text: a string as it is, the text parts of a content list, else JSON."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return _json_text(_brief(content))


def _input_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _json_text(_brief(value))


# -- calls ------------------------------------------------------------------------------------


def chat_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """One entry of a chat message's `tool_calls`: `function`, `custom` or any later type,
    whose body sits under the key named by its type."""
    kind = str(call.get("type") or "function")
    body = as_object(call.get(kind))
    if kind == "function":
        arguments: Any = body.get("arguments")
    elif kind == "custom":
        arguments = body.get("input")
    else:
        arguments = body.get("arguments", body.get("input", body or None))
    return {
        "id": _text_or_none(call.get("id")),
        "type": kind,
        "name": body.get("name") if isinstance(body.get("name"), str) else kind,
        "arguments": arguments if isinstance(arguments, str) else _input_text(arguments),
    }


def is_call_item(item: dict[str, Any]) -> bool:
    kind = item.get("type")
    if not isinstance(kind, str):
        return False
    if kind in CALL_ITEMS:
        return True
    # A tool-call item type added after this gateway: `<tool>_call` with an id.
    return kind.endswith("_call") and isinstance(item.get("call_id") or item.get("id"), str)


def call_id_of(item: dict[str, Any]) -> str | None:
    """The id results use to refer to the call: `call_id`, or the item's `id` for tools the
    provider runs (web search, MCP, ...) which have no other."""
    if item.get("type") in HOSTED_CALLS:
        return _text_or_none(item.get("id") or item.get("call_id"))
    return _text_or_none(item.get("call_id") or item.get("id"))


def _text_or_none(value: Any) -> str | None:
    """An id as the upstream gave it, when it is text: anything else names nothing."""
    return value if isinstance(value, str) else None


def response_tool_call(item: dict[str, Any]) -> dict[str, Any]:
    """A Responses output item that asks for a tool, as a span's tool call."""
    kind = str(item["type"])
    name, key = CALL_ITEMS.get(kind, (None, None))
    if key is not None:
        given: Any = item.get(key)
        if kind == "computer_call" and given is None:
            given = item.get("actions")
    elif kind in CALL_ITEMS:
        given = None
    else:
        given = {k: v for k, v in item.items() if k not in _META_FIELDS} or None
    if name is None:
        name = item.get("name") if isinstance(item.get("name"), str) else kind.removesuffix("_call")
    return {"id": call_id_of(item), "type": kind, "name": name, "arguments": _input_text(given)}


def response_tool_calls(output: Any) -> list[dict[str, Any]]:
    return [response_tool_call(item) for item in objects_in(output) if is_call_item(item)]


# -- results ----------------------------------------------------------------------------------


def _exit_failed(output: Any) -> bool | None:
    """A shell's outcome: failed on a non-zero exit code or a timeout."""
    outcomes = [as_object(chunk.get("outcome")) for chunk in objects_in(output)]
    if not outcomes:
        return None
    return any(
        o.get("type") == "timeout"
        or (o.get("type") == "exit" and o.get("exit_code") not in (0, None))
        for o in outcomes
    )


def _local_shell_result(output: Any) -> tuple[str, bool | None]:
    """`local_shell_call_output.output` is JSON text; its exit code, when it has one, decides."""
    text = output if isinstance(output, str) else text_of(output)
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text, None
    if not isinstance(parsed, dict):
        return text, None
    code = parsed.get("exit_code", as_object(parsed.get("metadata")).get("exit_code"))
    if isinstance(code, int) and not isinstance(code, bool):
        return text, code != 0
    return text, None


def _status_failed(item: dict[str, Any]) -> bool | None:
    status = item.get("status")
    if status == "failed":
        return True
    return False if status == "completed" else None


def result_of(item: dict[str, Any]) -> ToolResult | None:
    """A result item (`*_output` with a `call_id`) as a tool result, or None."""
    kind = item.get("type")
    if not isinstance(kind, str):
        return None
    call_id = item.get("call_id")
    if kind == "local_shell_call_output":
        # Its `id` is the call's id in the SDK's types; `call_id` where a client sends one.
        call_id = call_id or item.get("id")
    if not isinstance(call_id, str) or not (kind in RESULT_ITEMS or kind.endswith("_output")):
        return None
    output = item.get("output")
    if kind == "shell_call_output":
        text = "".join(
            str(chunk.get("stdout") or "") + str(chunk.get("stderr") or "")
            for chunk in objects_in(output)
        )
        return ToolResult(call_id, text, _exit_failed(output))
    if kind == "local_shell_call_output":
        return ToolResult(call_id, *_local_shell_result(output))
    if kind == "apply_patch_call_output":
        return ToolResult(
            call_id, text_of(output) or str(item.get("status") or ""), _status_failed(item)
        )
    if kind == "computer_call_output":
        return ToolResult(
            call_id, text_of(output), True if item.get("status") == "failed" else None
        )
    if kind == "program_output":
        return ToolResult(call_id, text_of(item.get("result")), None)
    if kind == "tool_search_output":
        return ToolResult(call_id, text_of(item.get("tools")), None)
    if kind in ("function_call_output", "custom_tool_call_output"):
        return ToolResult(call_id, text_of(output), None)
    given = (
        output if output is not None else {k: v for k, v in item.items() if k not in _META_FIELDS}
    )
    return ToolResult(call_id, text_of(given), True if item.get("status") == "failed" else None)


def hosted_result(item: dict[str, Any]) -> ToolResult | None:
    """The result a tool the provider ran carries in its own call item, once it finished."""
    kind = item.get("type")
    call_id = call_id_of(item)
    if kind not in HOSTED_CALLS or kind == "program" or not isinstance(call_id, str):
        return None
    status = item.get("status")
    if kind == "mcp_call":
        error = item.get("error")
        if error:
            return ToolResult(call_id, text_of(error), True)
        if item.get("output") is None and status not in ("completed", "failed", "incomplete"):
            return None  # waiting for approval, or still running
        return ToolResult(call_id, text_of(item.get("output")), status == "failed")
    if status not in ("completed", "failed", "incomplete"):
        return None
    if kind == "file_search_call":
        text = text_of(item.get("results"))
    elif kind == "code_interpreter_call":
        outputs = objects_in(item.get("outputs"))
        text = "".join(str(o.get("logs") or "") for o in outputs) or text_of(outputs)
    elif kind == "image_generation_call":
        text = "an image" if item.get("result") else ""
    else:
        text = str(status)
    return ToolResult(call_id, text, status == "failed")


def executed_in(output: Any) -> list[tuple[dict[str, Any], ToolResult]]:
    """Tools run within one answer (by the provider): each call with its result, found in
    the call item itself or in a result item of the same output."""
    items = objects_in(output)
    results = {r.call_id: r for item in items if (r := result_of(item)) is not None}
    found = []
    for item in items:
        if not is_call_item(item):
            continue
        call = response_tool_call(item)
        result = results.get(call["id"]) or hosted_result(item)
        if result is not None:
            found.append((call, result))
    return found


# -- the conversation a request carries -------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """A tool result in a request, with the call the request shows it answering."""

    result: ToolResult
    # The call as the request itself shows it (the nearest earlier call with the id), if any.
    call: dict[str, Any] | None
    # The result answers the request's latest assistant turn (comes after its last call).
    latest: bool


def _chat_steps(messages: Any) -> Iterator[tuple[list[dict[str, Any]], ToolResult | None]]:
    """(calls asked, None) for each assistant turn with tool calls, (​[], result) for each
    tool message, in order."""
    for message in objects_in(messages):
        role = message.get("role")
        if role == "assistant":
            calls = [chat_tool_call(c) for c in objects_in(message.get("tool_calls"))]
            if calls:
                yield calls, None
        elif role == "tool" and isinstance(message.get("tool_call_id"), str):
            yield [], ToolResult(message["tool_call_id"], text_of(message.get("content")))


def _response_steps(given: Any) -> Iterator[tuple[list[dict[str, Any]], ToolResult | None]]:
    for item in objects_in(given):
        if is_call_item(item):
            if item.get("type") not in HOSTED_CALLS:
                yield [response_tool_call(item)], None
        elif (result := result_of(item)) is not None:
            yield [], result


def exchanges_in(payload: dict[str, Any]) -> list[Exchange]:
    """Every tool result the request carries, each with the call it follows in the request
    and whether it belongs to the latest assistant turn."""
    steps = [*_chat_steps(payload.get("messages")), *_response_steps(payload.get("input"))]
    last_call = max((i for i, (calls, _) in enumerate(steps) if calls), default=-1)
    asked: dict[Any, dict[str, Any]] = {}
    found: list[Exchange] = []
    for index, (calls, result) in enumerate(steps):
        # The nearest earlier call with an id is the one a result with that id answers.
        asked.update((call["id"], call) for call in calls)
        if result is not None:
            found.append(Exchange(result, asked.get(result.call_id), index > last_call))
    return found
