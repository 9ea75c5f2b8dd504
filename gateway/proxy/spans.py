"""What a span records about a model's answer: usage, finish reasons, tool calls, ids."""

from __future__ import annotations

from typing import Any

from gateway.proxy.tool_items import as_object, chat_tool_call, objects_in, response_tool_calls

# Request parameters copied into span attributes under OpenTelemetry GenAI names.
REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "max_output_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}


def request_attributes(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        name: payload[key]
        for key, name in REQUEST_ATTRIBUTES.items()
        if key in payload and isinstance(payload[key], int | float | str)
    }


# The range of counts the store keeps (`store.records.clean_int`): outside it a count is
# dropped there, so it is dropped here too, before cost, budgets and metrics count it.
MAX_COUNT = 2**63 - 1


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def _detail(usage: dict[str, Any], group: str, key: str) -> Any:
    details = usage.get(group)
    return details.get(key) if isinstance(details, dict) else None


def usage_of(operation: str, usage: Any) -> tuple[int | None, int | None, int | None, int | None]:
    """(input, output, cached input, reasoning output) tokens from an OpenAI usage object."""
    if not isinstance(usage, dict):
        return None, None, None, None
    # Images and transcriptions count as the Responses API does.
    if operation == "responses" or ("input_tokens" in usage and "prompt_tokens" not in usage):
        given = _int(usage.get("input_tokens"))
        taken = _int(usage.get("output_tokens"))
        cached = _detail(usage, "input_tokens_details", "cached_tokens")
        reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
    else:
        given = _int(usage.get("prompt_tokens"))
        taken = _int(usage.get("completion_tokens"))
        if taken is None and operation == "embeddings":
            taken = 0
        cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
        reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return given, taken, _int(cached), _int(reasoning)


# Statuses of a Responses object that has not finished: no finish reason yet.
UNFINISHED_STATUSES = frozenset({"in_progress", "queued"})


def finish_reasons_of(operation: str, body: dict[str, Any]) -> list[str]:
    if operation == "responses":
        details = body.get("incomplete_details") or {}
        reason = details.get("reason") if isinstance(details, dict) else None
        status = body.get("status")
        found = reason or (status if status not in UNFINISHED_STATUSES else None)
        return [str(found)] if found else []
    return [
        str(choice["finish_reason"])
        for choice in objects_in(body.get("choices"))
        if choice.get("finish_reason")
    ]


def tool_calls_of(operation: str, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every tool call the answer made, as `{id, type, name, arguments}` (arguments as text),
    of every tool type (`gateway.proxy.tool_items`)."""
    calls: list[dict[str, Any]] = []
    if operation == "chat":
        for choice in objects_in(body.get("choices")):
            message = as_object(choice.get("message"))
            calls.extend(chat_tool_call(call) for call in objects_in(message.get("tool_calls")))
    elif operation == "responses":
        calls = response_tool_calls(body.get("output"))
    return calls or None


def reply_fields(operation: str, body: Any) -> dict[str, Any]:
    """The span fields read off a complete (or assembled) answer."""
    if not isinstance(body, dict):
        return {}
    given, taken, cached, reasoning = usage_of(operation, body.get("usage"))
    return {
        "response_id": body.get("id") if isinstance(body.get("id"), str) else None,
        "response_model": body.get("model") if isinstance(body.get("model"), str) else None,
        "input_tokens": given,
        "output_tokens": taken,
        "cached_tokens": cached,
        "reasoning_tokens": reasoning,
        "finish_reasons": finish_reasons_of(operation, body) or None,
        "tool_calls": tool_calls_of(operation, body),
    }


def failure_of(operation: str, body: Any) -> tuple[str, str | None] | None:
    """(type, message) when a 200 answer says the call failed: a Responses object whose
    `status` is `failed` (an `incomplete` one finished early, with its reason, and is not)."""
    if operation != "responses" or not isinstance(body, dict) or body.get("status") != "failed":
        return None
    error = as_object(body.get("error"))
    kind = error.get("code") or error.get("type")
    message = error.get("message")
    return (
        str(kind) if kind else "response_failed",
        str(message) if message else "the upstream reported the response as failed",
    )


def error_fields(body: Any) -> tuple[str | None, str | None]:
    """(type, message) of an OpenAI-shaped error body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        kind = error.get("type") or error.get("code")
        return (str(kind) if kind else None, str(error.get("message") or "") or None)
    return None, None
