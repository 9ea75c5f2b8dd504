"""Tool executions seen from the conversation alone, recorded as `execute_tool {name}` spans.

When an answer asks for tool calls and a later request of the same attempt carries
their results (`role: tool` with the `tool_call_id`, or a Responses API
`function_call_output`), the time between the two is the tool's execution.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.proxy.attribution import new_span_id
from gateway.proxy.record import SpanRecord

MAX_ATTEMPTS_TRACKED = 20_000
MAX_RESULT_CHARS = 20_000
_ERROR_TEXT = re.compile(
    r"^\s*(error|exception|traceback|failed|failure)\b|traceback \(most recent call last\)"
    r"|\b(exception|errno|stack trace)\b|\bstatus(?:_code)?\W+[45]\d\d\b",
    re.IGNORECASE,
)


@dataclass(slots=True)
class PendingTool:
    call_id: str
    name: str
    arguments: str
    asked_by: str
    trace_id: str
    asked_end_ns: int


def looks_like_error(result: str) -> bool:
    """A heuristic: error words up front, a traceback, or a JSON object with an error key."""
    text = result.strip()
    if text.startswith("{"):
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and (
            parsed.get("error") or parsed.get("is_error") or parsed.get("status") == "error"
        ):
            return True
    return bool(_ERROR_TEXT.search(text[:2000]))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else orjson.dumps(content).decode()


def _results(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(call id, result text) for every tool result the request carries."""
    found = []
    for message in payload.get("messages") or ():
        if isinstance(message, dict) and message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str):
                found.append((call_id, _text(message.get("content"))))
    given = payload.get("input")
    if isinstance(given, list):
        for item in given:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                call_id = item.get("call_id")
                if isinstance(call_id, str):
                    found.append((call_id, _text(item.get("output"))))
    return found


class ToolTracker:
    """Tool calls still waiting for their results, per attempt (bounded, oldest dropped)."""

    def __init__(self, capacity: int = MAX_ATTEMPTS_TRACKED) -> None:
        self._capacity = capacity
        self._pending: OrderedDict[tuple[str, str], dict[str, PendingTool]] = OrderedDict()

    def note(self, span: SpanRecord) -> None:
        """Remember the tool calls a finished call asked for."""
        rollout, attempt = span.get("rollout_id"), span.get("attempt_id")
        if not rollout or not attempt or not span.get("tool_calls"):
            return
        key = (rollout, attempt)
        pending = self._pending.setdefault(key, {})
        self._pending.move_to_end(key)
        for call in span["tool_calls"]:
            if call.get("id"):
                pending[call["id"]] = PendingTool(
                    call["id"],
                    str(call.get("name") or ""),
                    str(call.get("arguments") or ""),
                    span["span_id"],
                    span["trace_id"],
                    span["end_ns"],
                )
        while len(self._pending) > self._capacity:
            self._pending.popitem(last=False)

    def resolve(
        self, rollout_id: str, attempt_id: str, payload: dict[str, Any]
    ) -> list[tuple[PendingTool, str]]:
        """The pending calls whose results this request carries (each is resolved once)."""
        pending = self._pending.get((rollout_id, attempt_id))
        if not pending:
            return []
        matched = []
        for call_id, result in _results(payload):
            tool = pending.pop(call_id, None)
            if tool is not None:
                matched.append((tool, result))
        if not pending:
            del self._pending[(rollout_id, attempt_id)]
        return matched


def tool_span(
    tool: PendingTool, result: str, *, rollout_id: str, attempt_id: str, seq: int, now_ns: int
) -> SpanRecord:
    """The span row of one tool execution, ending when its result reached the gateway."""
    failed = looks_like_error(result)
    duration_ns = max(now_ns - tool.asked_end_ns, 0)
    return {
        "span_id": new_span_id(),
        "trace_id": tool.trace_id,
        "parent_span_id": tool.asked_by,
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "seq": seq,
        "name": f"execute_tool {tool.name}",
        "operation": "execute_tool",
        "provider": None,
        "deployment": None,
        "model_group": None,
        "request_model": None,
        "response_model": None,
        "response_id": None,
        "status": "error" if failed else "ok",
        "http_status": None,
        "error_type": "tool_error" if failed else None,
        "error_message": result[:500] if failed else None,
        "stream": 0,
        "start_ns": tool.asked_end_ns,
        "end_ns": tool.asked_end_ns + duration_ns,
        "duration_ms": duration_ns / 1e6,
        "ttft_ms": None,
        "upstream_ms": None,
        "overhead_ms": None,
        "retries": 0,
        "input_tokens": None,
        "output_tokens": None,
        "cached_tokens": None,
        "reasoning_tokens": None,
        "cost_usd": None,
        "finish_reasons": None,
        "tool_calls": [{"id": tool.call_id, "name": tool.name, "arguments": tool.arguments}],
        "request_body": {"name": tool.name, "arguments": tool.arguments, "call_id": tool.call_id},
        "response_body": {"content": result[:MAX_RESULT_CHARS], "error": failed},
        "agent": None,
        "metadata": None,
        "prompt_token_ids": None,
        "completion_token_ids": None,
        "logprobs": None,
        "model_version": None,
        "mode": None,
        "held_ms": None,
        "attributes": {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool.name,
            "gen_ai.tool.call.id": tool.call_id,
        },
        "tags": [],
    }
