"""Tool executions seen from the conversation alone, recorded as `execute_tool {name}` spans.

When an answer asks for tool calls and a later request of the same attempt carries their
results (`role: tool` with the `tool_call_id`, or a Responses API `*_output` item), the time
between the two is the tool's execution. Tools the provider runs itself (web search, MCP,
code interpreter, ...) have their results in the answer and are recorded with it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from config.models import ToolErrorWhen
from gateway.proxy.attribution import new_span_id
from gateway.proxy.record import SpanRecord
from gateway.proxy.tool_items import ToolResult, exchanges_in

MAX_ATTEMPTS_TRACKED = 20_000
# Calls still waiting for a result, per attempt; the oldest go first past this.
MAX_PENDING_PER_ATTEMPT = 50_000
MAX_RESULT_CHARS = 20_000
# Text that starts like this is a failure report, not a result that merely mentions one.
_ERROR_MARKER = re.compile(
    r"\A\s*(?:(?i:error\s*:|exception\s*:|traceback \(most recent call last\)|fatal\s*:"
    r"|panic\s*:)|\[?ERROR\b|[\w.]*(?:Error|Exception)\s*:)"
)
# How much of a result is searched by a rule's regular expressions.
MAX_SEARCHED_CHARS = 20_000


@dataclass(slots=True)
class PendingTool:
    call_id: str
    name: str
    arguments: str
    asked_by: str
    trace_id: str
    asked_end_ns: int
    kind: str = "function"


def _error_flag(value: Any) -> bool:
    """An `error` value that reports one: a non-empty string, object or list, or `true`."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, dict | list):
        return bool(value)
    return value is True


def json_says_error(text: str) -> bool:
    """A JSON object reporting an error: `error` not empty, `is_error`/`isError` true, or
    `status: "error"`, also as MCP content (`{"isError": true, "content": [...]}`)."""
    text = text.strip()
    if not text.startswith("{"):
        return False
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(parsed, dict):
        return False
    return (
        _error_flag(parsed.get("error"))
        or parsed.get("is_error") is True
        or parsed.get("isError") is True
        or parsed.get("status") == "error"
    )


def starts_with_error(text: str) -> bool:
    """Text that begins with an error marker: `Error:`, `ERROR`, `Exception:`,
    `ValueError: ...`, `Traceback (most recent call last)`, `fatal:`, `panic:`."""
    return bool(_ERROR_MARKER.match(text[:500]))


def looks_like_error(result: str | ToolResult, rule: ToolErrorWhen = "default") -> bool:
    """Whether a tool's result makes its span an error, under `rule` (`tools.error_when`)."""
    if rule == "never":
        return False
    if isinstance(result, ToolResult):
        if result.failed is not None:
            return result.failed
        text = result.text
    else:
        text = result
    if json_says_error(text):
        return True
    if rule == "json":
        return False
    if isinstance(rule, list):
        searched = text[:MAX_SEARCHED_CHARS]
        return any(re.search(pattern, searched, re.MULTILINE) for pattern in rule)
    return starts_with_error(text)


def _same_call(tool: PendingTool, asked: dict[str, Any] | None, *, strict: bool) -> bool:
    if asked is None:
        return not strict
    if tool.name != str(asked.get("name") or ""):
        return False
    return not strict or tool.arguments == str(asked.get("arguments") or "")


class _Pending:
    """One attempt's calls waiting for results, by id (ids repeat: a list each, oldest first)."""

    __slots__ = ("by_id", "count")

    def __init__(self) -> None:
        self.by_id: dict[str, list[PendingTool]] = {}
        self.count = 0

    def add(self, tool: PendingTool) -> None:
        self.by_id.setdefault(tool.call_id, []).append(tool)
        self.count += 1
        if self.count > MAX_PENDING_PER_ATTEMPT:
            # The id seen first (near enough the oldest call) gives up its oldest call.
            self.remove(self.by_id[next(iter(self.by_id))][0])

    def remove(self, tool: PendingTool) -> None:
        same = self.by_id[tool.call_id]
        same.remove(tool)
        if not same:
            del self.by_id[tool.call_id]
        self.count -= 1


class ToolTracker:
    """Tool calls still waiting for their results, per attempt (bounded, oldest dropped).

    Providers reuse ids across turns (`call_0` every turn), so a call is found by its id
    and by what the request shows it was: a result of the latest assistant turn takes the
    newest pending call of that id (the same tool, if there is one); a result of an earlier
    turn only a pending call with the same tool and arguments.
    """

    def __init__(self, capacity: int = MAX_ATTEMPTS_TRACKED) -> None:
        self._capacity = capacity
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()

    def note(self, span: SpanRecord, done: frozenset[str] = frozenset()) -> None:
        """Remember the tool calls a finished call asked for (but those in `done`, whose
        results the answer already has)."""
        rollout, attempt, calls = (
            span.get("rollout_id"),
            span.get("attempt_id"),
            span.get("tool_calls"),
        )
        if not rollout or not attempt or not calls:
            return
        key = (rollout, attempt)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        self._pending.move_to_end(key)
        for call in calls:
            if call.get("id") and call["id"] not in done:
                pending.add(pending_tool(call, span))
        while len(self._pending) > self._capacity:
            self._pending.popitem(last=False)

    def resolve(
        self, rollout_id: str, attempt_id: str, payload: dict[str, Any]
    ) -> list[tuple[PendingTool, ToolResult]]:
        """The pending calls whose results this request carries (each is resolved once)."""
        pending = self._pending.get((rollout_id, attempt_id))
        if not pending:
            return []
        matched: list[tuple[PendingTool, ToolResult]] = []
        # The latest turn first, so an older result with a reused id cannot take its call.
        for exchange in sorted(exchanges_in(payload), key=lambda e: not e.latest):
            same_id = pending.by_id.get(exchange.result.call_id)
            if not same_id:
                continue
            found: PendingTool | None
            if exchange.latest:
                fitting = [t for t in same_id if _same_call(t, exchange.call, strict=False)]
                found = (fitting or same_id)[-1]
            else:
                fitting = [t for t in same_id if _same_call(t, exchange.call, strict=True)]
                found = fitting[0] if fitting else None
            if found is not None:
                pending.remove(found)
                matched.append((found, exchange.result))
        if not pending.count:
            del self._pending[(rollout_id, attempt_id)]
        return matched


def pending_tool(call: dict[str, Any], span: SpanRecord) -> PendingTool:
    """A tool call of a finished span, as it waits for its result."""
    return PendingTool(
        str(call.get("id") or ""),
        str(call.get("name") or ""),
        str(call.get("arguments") or ""),
        span["span_id"],
        span["trace_id"],
        span["end_ns"],
        str(call.get("type") or "function"),
    )


def tool_span(
    tool: PendingTool,
    result: str | ToolResult,
    *,
    rollout_id: str,
    attempt_id: str,
    seq: int,
    now_ns: int,
    rule: ToolErrorWhen = "default",
) -> SpanRecord:
    """The span row of one tool execution, ending when its result reached the gateway."""
    failed = looks_like_error(result, rule)
    text = result.text if isinstance(result, ToolResult) else result
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
        "upstream_status": None,
        "error_type": "tool_error" if failed else None,
        "error_message": text[:500] if failed else None,
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
        "tool_calls": [
            {
                "id": tool.call_id,
                "type": tool.kind,
                "name": tool.name,
                "arguments": tool.arguments,
            }
        ],
        "request_body": {"name": tool.name, "arguments": tool.arguments, "call_id": tool.call_id},
        "response_body": {"content": text[:MAX_RESULT_CHARS], "error": failed},
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
            # The item type (`function`, `custom`, `shell_call`, ...): finer than the
            # `gen_ai.tool.type` the conventions define, so under our own name.
            "spangate.tool.type": tool.kind,
        },
        "tags": [],
    }
