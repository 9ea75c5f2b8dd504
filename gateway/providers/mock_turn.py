"""What the `mock` model says next, for chat and Responses alike: tool calls while tools are
offered and unanswered, a text (or JSON) answer once their results are in, a refusal on request.

The wire formats live in `mock.py`; this module only reads a conversation and decides, so a
framework's loop (call tools, send results, get a final answer) runs to its end offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.providers.mock_schema import sample_arguments, sample_value

# A user message containing this marker gets a refusal instead of an answer.
REFUSE_MARKER = "[refuse]"
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
RESULT_PREVIEW_CHARS = 80
QUESTION_PREVIEW_CHARS = 120


@dataclass(frozen=True)
class ToolCall:
    """One function call the mock makes; `arguments` is JSON text, as on the wire."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    """The mock's answer: tool calls, or a text, or a refusal."""

    text: str = ""
    refusal: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Conversation:
    """A request, read the same way for both APIs."""

    messages: list[dict[str, Any]]
    results: list[str]
    tools: list[dict[str, Any]]
    tool_choice: Any = None
    parallel: bool = True
    schema: dict[str, Any] | None = None
    json_object: bool = False
    seed: bytes = b""


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def next_turn(conversation: Conversation) -> Turn:
    """Refuse when asked to, call tools while none was answered, else answer."""
    asked = _last_user_text(conversation.messages)
    if not conversation.results and REFUSE_MARKER in asked:
        return Turn(refusal=REFUSAL_TEXT)
    calls = _tool_calls(conversation)
    if calls:
        return Turn(tool_calls=calls)
    text = _reply(asked, conversation.results)
    if conversation.schema is not None:
        text = orjson.dumps(sample_value(conversation.schema)).decode()
    elif conversation.json_object:
        text = orjson.dumps({"answer": text}).decode()
    return Turn(text=text)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    return text_of(last.get("content")).strip().replace("\n", " ")


def _reply(asked: str, results: list[str]) -> str:
    if results:
        shown = [repr(r.strip()[:RESULT_PREVIEW_CHARS]) for r in results]
        if len(shown) == 1:
            return f"The tool returned {shown[0]}, so that is my answer."
        return f"The tools returned {', '.join(shown[:-1])} and {shown[-1]}, so that is my answer."
    if not asked:
        return "Hello! I am the spangate mock model."
    return f"This is a mock answer to: {asked[:QUESTION_PREVIEW_CHARS]}"


def _tool_calls(conversation: Conversation) -> list[ToolCall]:
    tools, choice = conversation.tools, conversation.tool_choice
    if conversation.results or not tools or choice == "none":
        return []
    forced = _forced_name(choice)
    if forced is not None:
        chosen = [t for t in tools if t["name"] == forced][:1]
    elif conversation.parallel:
        chosen = tools
    else:
        chosen = tools[:1]
    digest = hashlib.sha1(conversation.seed).hexdigest()[:24]
    return [
        ToolCall(
            # The first call keeps the id of a conversation's hash alone, as before.
            call_id=f"call_{digest}" if i == 0 else f"call_{digest}_{i}",
            name=tool["name"],
            arguments=orjson.dumps(sample_arguments(tool["parameters"])).decode(),
        )
        for i, tool in enumerate(chosen)
    ]


def _forced_name(choice: Any) -> str | None:
    # Chat: {"type": "function", "function": {"name": N}}; Responses: {"type": "function", "name": N}.
    if not isinstance(choice, dict):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else choice.get("name")
    return name if isinstance(name, str) else None
