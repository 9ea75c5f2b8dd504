"""Usage of streams whose upstream refuses the `stream_options` the gateway would add: the
refusal recognised, the deployment remembered, and tokens estimated when a stream has none."""

from __future__ import annotations

import time
from typing import Any

from gateway.providers.base import UpstreamResponse
from gateway.proxy.resilience import Guard, prompt_tokens
from gateway.proxy.spans import as_object, objects_in

# How long a deployment that refused `stream_options` goes without it: long enough not to pay
# a refused request per stream, short enough to notice an upgraded server within the hour.
REFUSAL_MEMORY_SECONDS = 3600.0
# Statuses an upstream refuses an unknown request argument with (vLLM and friends use 400,
# some validating servers 422).
REFUSAL_STATUSES = frozenset({400, 422})
ESTIMATED = "spangate.usage_estimated"


def asks_for_usage(guard: Guard) -> bool:
    """Whether the gateway may add `stream_options` on this deployment right now."""
    return guard.refuses_stream_options_until <= time.monotonic()


def refused_stream_options(response: UpstreamResponse) -> bool:
    """An upstream's 400 (or 422) that names `stream_options`, the field the gateway added."""
    return (
        response.status in REFUSAL_STATUSES
        and response.chunks is None
        and b"stream_options" in (response.body or b"")
    )


def remember_refusal(guard: Guard) -> None:
    guard.refuses_stream_options_until = time.monotonic() + REFUSAL_MEMORY_SECONDS


def _answer_chars(operation: str, result: dict[str, Any]) -> int:
    chars = 0
    for choice in objects_in(result.get("choices")):
        if operation == "text_completion":
            text = choice.get("text")
            chars += len(text) if isinstance(text, str) else 0
            continue
        message = as_object(choice.get("message"))
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else 0
        for call in objects_in(message.get("tool_calls")):
            function = as_object(call.get("function"))
            chars += len(str(function.get("name") or "")) + len(
                str(function.get("arguments") or "")
            )
    return chars


def estimate_missing_usage(
    operation: str,
    payload: dict[str, Any],
    result: Any,
    fields: dict[str, Any],
    attributes: dict[str, Any],
) -> None:
    """Tokens of a chat or completion stream that reported none, estimated at four
    characters a token (prompt and answer), and the span marked as estimated."""
    if operation not in ("chat", "text_completion") or not isinstance(result, dict):
        return
    if fields.get("input_tokens") is not None or fields.get("output_tokens") is not None:
        return
    prompt = {key: payload.get(key) for key in ("messages", "prompt")}
    fields["input_tokens"] = prompt_tokens(prompt)
    fields["output_tokens"] = _answer_chars(operation, result) // 4 + 1
    attributes[ESTIMATED] = True
