"""The built-in `mock` provider: an offline fake model that speaks OpenAI's wire format.

It answers chat, completions, embeddings and responses, with usage numbers in proportion to
the text, so the quickstart and the tests run with no network and no keys. What it says in a
tool loop (calls, answers from results, JSON, refusals) is decided in `mock_turn.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.providers import mock_surface
from gateway.providers.base import UpstreamRequest, UpstreamResponse
from gateway.providers.mock_turn import Conversation, Turn, next_turn, text_of

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ids = itertools.count(1)
EMBEDDING_SIZE = 16


def _new_id(prefix: str) -> str:
    return f"{prefix}-mock{next(_ids):010d}"


def count_tokens(text: str) -> int:
    """About four characters a token, as for English with OpenAI's tokenizers."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _prompt_tokens(messages: list[Any]) -> int:
    # Each message costs a few tokens of framing on top of its text, as with OpenAI.
    return 3 + sum(
        4 + count_tokens(text_of(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def _answer_tokens(turn: Turn) -> int:
    if turn.tool_calls:
        return sum(count_tokens(call.arguments) + 5 for call in turn.tool_calls)
    return count_tokens(turn.refusal if turn.refusal is not None else turn.text)


def _function_tools(tools: Any) -> list[dict[str, Any]]:
    """The offered function tools as `{name, parameters}`, from chat's or Responses' shape."""
    found = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        spec = _object(tool.get("function")) or tool
        found.append(
            {"name": str(spec.get("name") or "tool"), "parameters": spec.get("parameters")}
        )
    return found


def _trailing_results(messages: list[dict[str, Any]]) -> list[str]:
    """The tool results after the last non-tool message: what the answer is made from."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, text_of(message.get("content")))
    return results


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _chat_conversation(payload: dict[str, Any]) -> Conversation:
    messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
    form = _object(payload.get("response_format"))
    schema = _object(_object(form.get("json_schema")).get("schema"))
    return _conversation(payload, messages, form, schema, payload.get("messages"))


def _conversation(
    payload: dict[str, Any],
    messages: list[dict[str, Any]],
    form: dict[str, Any],
    schema: dict[str, Any],
    seed: Any,
) -> Conversation:
    """What the mock answers from, the same for chat and Responses; `form` is the requested
    output format (`response_format` or `text.format`) and `schema` its JSON schema."""
    return Conversation(
        messages=messages,
        results=_trailing_results(messages),
        tools=_function_tools(payload.get("tools")),
        tool_choice=payload.get("tool_choice"),
        parallel=payload.get("parallel_tool_calls") is not False,
        schema=schema if form.get("type") == "json_schema" else None,
        json_object=form.get("type") == "json_object",
        seed=orjson.dumps(seed or []),
    )


def _responses_messages(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Responses input as chat-like messages: calls as assistant turns, outputs as tool turns."""
    given = payload.get("input")
    messages: list[dict[str, Any]] = []
    if isinstance(payload.get("instructions"), str):
        messages.append({"role": "system", "content": payload["instructions"]})
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    for item in given if isinstance(given, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call_output":
            messages.append({"role": "tool", "content": text_of(item.get("output"))})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": str(item.get("arguments", ""))})
        elif kind in (None, "message"):
            messages.append({"role": item.get("role"), "content": text_of(item.get("content"))})
    return messages


def _responses_conversation(
    payload: dict[str, Any], messages: list[dict[str, Any]]
) -> Conversation:
    form = _object(_object(payload.get("text")).get("format"))
    return _conversation(payload, messages, form, _object(form.get("schema")), payload.get("input"))


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chat(payload: dict[str, Any], model: str) -> tuple[dict[str, Any], list[bytes]]:
    """The plain answer and the same answer as stream events."""
    messages = payload.get("messages") or []
    turn = next_turn(_chat_conversation(payload))
    prompt, completion = _prompt_tokens(messages), _answer_tokens(turn)
    ident, created = _new_id("chatcmpl"), int(time.time())
    finish = "tool_calls" if turn.tool_calls else "stop"
    said = not turn.tool_calls and turn.refusal is None
    message: dict[str, Any] = {"role": "assistant", "content": turn.text if said else None}
    if turn.refusal is not None:
        message["refusal"] = turn.refusal
    if turn.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in turn.tool_calls
        ]
    plain = {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(prompt, completion),
    }
    options = payload.get("stream_options") or {}
    with_usage = bool(options.get("include_usage"))

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if with_usage:
            obj["usage"] = None
        return _sse(obj)

    events = [chunk({"role": "assistant", "content": "" if said else None})]
    for index, call in enumerate(turn.tool_calls):
        opening = {"index": index, "id": call.call_id, "type": "function"}
        events.append(
            chunk({"tool_calls": [{**opening, "function": {"name": call.name, "arguments": ""}}]})
        )
        for start in range(0, len(call.arguments), 8):
            piece = call.arguments[start : start + 8]
            events.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    if turn.refusal is not None:
        events.extend(chunk({"refusal": word}) for word in _words(turn.refusal))
    elif said:
        events.extend(chunk({"content": word}) for word in _words(turn.text))
    events.append(chunk({}, finish))
    if with_usage:
        events.append(
            _sse(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_mock",
                    "choices": [],
                    "usage": plain["usage"],
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return plain, events


def _completion(payload: dict[str, Any], model: str) -> tuple[dict[str, Any], list[bytes]]:
    prompt_value = payload.get("prompt") or ""
    prompt_text = (
        prompt_value if isinstance(prompt_value, str) else " ".join(map(str, prompt_value))
    )
    text = f" mock continuation of {prompt_text[:60]!r}"
    prompt, completion = count_tokens(prompt_text), count_tokens(text)
    ident, created = _new_id("cmpl"), int(time.time())
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    plain = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    with_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

    def chunk(piece: str, finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}],
        }
        if with_usage:
            obj["usage"] = None
        return _sse(obj)

    events = [chunk(word, None) for word in _words(text)]
    events.append(chunk("", "stop"))
    if with_usage:
        events.append(
            _sse(
                {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return plain, events


def _embedding_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b / 255.0 - 0.5 for b in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _embeddings(payload: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = payload.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    texts = [item if isinstance(item, str) else orjson.dumps(item).decode() for item in items]
    tokens = sum(count_tokens(t) for t in texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding_vector(t)}
            for i, t in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _response_items(turn: Turn) -> list[dict[str, Any]]:
    """The output items of a Responses answer: function calls, or one message."""
    if turn.tool_calls:
        return [
            {
                "id": f"fc_{call.call_id.removeprefix('call_')}",
                "type": "function_call",
                "status": "completed",
                "arguments": call.arguments,
                "call_id": call.call_id,
                "name": call.name,
            }
            for call in turn.tool_calls
        ]
    part: dict[str, Any] = (
        {"type": "refusal", "refusal": turn.refusal}
        if turn.refusal is not None
        else {"type": "output_text", "text": turn.text, "annotations": []}
    )
    return [
        {
            "id": _new_id("msg"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
    ]


def _item_events(index: int, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One output item as stream events, in the order OpenAI sends them."""
    where = {"item_id": item["id"], "output_index": index}
    if item["type"] == "function_call":
        arguments = item["arguments"]
        return [
            (
                "response.output_item.added",
                {"output_index": index, "item": {**item, "arguments": "", "status": "in_progress"}},
            ),
            *(
                ("response.function_call_arguments.delta", {**where, "delta": arguments[i : i + 8]})
                for i in range(0, len(arguments), 8)
            ),
            (
                "response.function_call_arguments.done",
                {**where, "name": item["name"], "arguments": arguments},
            ),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]
    part = item["content"][0]
    field = "refusal" if part["type"] == "refusal" else "text"
    kind = "response.refusal" if field == "refusal" else "response.output_text"
    at = {**where, "content_index": 0}
    return [
        (
            "response.output_item.added",
            {"output_index": index, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**at, "part": {**part, field: ""}}),
        *((f"{kind}.delta", {**at, "delta": word}) for word in _words(part[field])),
        (f"{kind}.done", {**at, field: part[field]}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"output_index": index, "item": item}),
    ]


def _responses(payload: dict[str, Any], model: str) -> tuple[dict[str, Any], list[bytes]]:
    messages = _responses_messages(payload)
    turn = next_turn(_responses_conversation(payload, messages))
    prompt, completion = _prompt_tokens(messages), _answer_tokens(turn)
    output = _response_items(turn)
    response = {
        "id": _new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": output,
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
        "parallel_tool_calls": payload.get("parallel_tool_calls") is not False,
        "tool_choice": payload.get("tool_choice") or "auto",
        "tools": payload.get("tools") if isinstance(payload.get("tools"), list) else [],
    }
    in_progress = {**response, "status": "in_progress", "output": [], "usage": None}
    steps = [("response.created", {"response": in_progress})]
    steps.append(("response.in_progress", {"response": in_progress}))
    for index, item in enumerate(output):
        steps.extend(_item_events(index, item))
    steps.append(("response.completed", {"response": response}))
    events = [
        f"event: {kind}\n".encode() + _sse({"type": kind, "sequence_number": n, **fields})
        for n, (kind, fields) in enumerate(steps)
    ]
    return response, events


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for raw in events:
        yield raw
        # Hand the loop back between chunks, as a network stream would.
        await asyncio.sleep(0)


async def send(request: UpstreamRequest) -> UpstreamResponse:
    """Answer like an OpenAI-compatible upstream would, without leaving the process."""
    deployment = request.deployment
    if deployment.mock_latency:
        await asyncio.sleep(deployment.mock_latency)
    payload, model = request.payload, deployment.model
    if request.operation in mock_surface.OPERATIONS:
        return mock_surface.answer(request, model)
    if request.operation == "embeddings":
        return UpstreamResponse(
            200, dict(_JSON_HEADERS), body=orjson.dumps(_embeddings(payload, model))
        )
    build = {"chat": _chat, "text_completion": _completion, "responses": _responses}[
        request.operation
    ]
    plain, events = build(payload, model)
    if request.operation == "responses":
        mock_surface.remember(plain, payload)
    if request.stream:
        return UpstreamResponse(200, dict(_SSE_HEADERS), chunks=_replay(events))
    return UpstreamResponse(200, dict(_JSON_HEADERS), body=orjson.dumps(plain))
