"""A request body parsed once and checked as OpenAI checks it: JSON, nesting, the fields each
operation needs.

orjson parses up to 1024 levels but serializes only 254, and the gateway serializes what it
parsed again (a renamed model, injected stream options, the record, litellm's copy), so a
body it accepted could fail later with a 500. `MAX_JSON_DEPTH` leaves room for those
wrappers; no real request comes near it.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest

MAX_JSON_DEPTH = 128


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than `limit` levels (the top one is level 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def loads(raw: bytes) -> Any:
    """Parse a request body; InvalidRequest for anything that is not JSON we can work with."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    # Nesting needs brackets: a body with few of them is shallow, without walking it.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(value):
        raise InvalidRequest(
            f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            code="json_too_deep",
        )
    return value


def _check_fields(operation: str, payload: dict[str, Any]) -> None:
    """The fields each operation cannot do without, checked as OpenAI checks them."""
    if operation == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("`messages` must be a non-empty array", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"`messages[{index}]` must be an object with a string `role`",
                    param=f"messages[{index}]",
                )
        _check_tools(payload.get("tools"))
        return
    name = {"text_completion": "prompt", "embeddings": "input", "responses": "input"}.get(operation)
    if name is None:
        return
    value = payload.get(name)
    if not isinstance(value, str | list) or (operation == "embeddings" and not value):
        raise InvalidRequest(f"`{name}` must be a string or an array", param=name)


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("`tools` must be an array", param="tools")
    for index, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        schema = function.get("parameters", {}) if isinstance(function, dict) else {}
        if not isinstance(schema, dict):
            raise InvalidRequest(
                f"`tools[{index}].function.parameters` must be a JSON Schema object",
                param=f"tools[{index}].function.parameters",
            )
        if not isinstance(kind, str) or (kind == "function" and not named):
            raise InvalidRequest(
                f"`tools[{index}]` must be an object with a `function` that has a `name`",
                param=f"tools[{index}]",
            )


def parse_payload(raw: bytes, operation: str | None = None) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    payload = loads(raw)
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if "stream" in payload and not isinstance(payload["stream"], bool | None):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    if operation is not None:
        _check_fields(operation, payload)
    return payload
