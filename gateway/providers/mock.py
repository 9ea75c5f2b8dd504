"""The built-in `mock` provider: an offline fake model that speaks OpenAI's wire format.

It answers chat (plain, streamed, tool calls when tools are offered), completions,
embeddings and responses, with usage numbers in proportion to the text, so the
quickstart and the tests run with no network and no keys.
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

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ids = itertools.count(1)
EMBEDDING_SIZE = 16


def _new_id(prefix: str) -> str:
    return f"{prefix}-mock{next(_ids):010d}"


def count_tokens(text: str) -> int:
    """About four characters a token, as for English with OpenAI's tokenizers."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _prompt_tokens(messages: list[Any]) -> int:
    # Each message costs a few tokens of framing on top of its text, as with OpenAI.
    return 3 + sum(
        4 + count_tokens(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def _reply_for(messages: list[Any]) -> str:
    last = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {}
    )
    asked = _text_of(last.get("content")).strip().replace("\n", " ")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        result = _text_of(messages[-1].get("content")).strip()[:80]
        return f"The tool returned {result!r}, so that is my answer."
    if not asked:
        return "Hello! I am the spangate mock model."
    return f"This is a mock answer to: {asked[:120]}"


def _sample_value(schema: Any) -> Any:
    # Schemas come from clients: anything malformed is treated as an empty schema.
    schema = schema if isinstance(schema, dict) else {}
    kind = schema.get("type")
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return [_sample_value(schema.get("items") or {"type": "string"})]
    if kind == "object":
        return _sample_arguments(schema)
    return "example"


def _sample_arguments(schema: Any) -> dict[str, Any]:
    schema = schema if isinstance(schema, dict) else {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = (
        schema.get("required") if isinstance(schema.get("required"), list) else list(properties)
    )
    return {
        str(name): _sample_value(properties.get(name)) for name in required if isinstance(name, str)
    }


def _tool_call(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The call the mock makes: the first offered tool, unless it was just answered."""
    tools = payload.get("tools") or []
    messages = payload.get("messages") or []
    if not tools or payload.get("tool_choice") == "none":
        return None
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    first = tools[0] if isinstance(tools, list) and isinstance(tools[0], dict) else {}
    function = first.get("function") if isinstance(first.get("function"), dict) else {}
    arguments = _sample_arguments(function.get("parameters"))
    return {
        "id": f"call_{hashlib.sha1(orjson.dumps(messages)).hexdigest()[:24]}",
        "type": "function",
        "function": {
            "name": function.get("name", "tool"),
            "arguments": orjson.dumps(arguments).decode(),
        },
    }


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
    call = _tool_call(payload)
    text = "" if call else _reply_for(messages)
    prompt = _prompt_tokens(messages)
    completion = count_tokens(call["function"]["arguments"]) + 5 if call else count_tokens(text)
    ident, created = _new_id("chatcmpl"), int(time.time())
    finish = "tool_calls" if call else "stop"
    message: dict[str, Any] = {"role": "assistant", "content": None if call else text}
    if call:
        message["tool_calls"] = [call]
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

    events = [chunk({"role": "assistant", "content": ""})]
    if call:
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 8):
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
                        ]
                    }
                )
            )
    else:
        events.extend(chunk({"content": word}) for word in _words(text))
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


def _responses(payload: dict[str, Any], model: str) -> tuple[dict[str, Any], list[bytes]]:
    given = payload.get("input")
    if isinstance(given, str):
        messages: list[Any] = [{"role": "user", "content": given}]
    else:
        messages = [
            {"role": m.get("role"), "content": _text_of(m.get("content"))}
            for m in given or []
            if isinstance(m, dict)
        ]
    text = _reply_for(messages)
    prompt, completion = _prompt_tokens(messages), count_tokens(text)
    ident, message_id, created = _new_id("resp"), _new_id("msg"), int(time.time())
    output_item = {
        "id": message_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    response = {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": model,
        "output": [output_item],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    in_progress = {**response, "status": "in_progress", "output": [], "usage": None}
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        return f"event: {kind}\n".encode() + _sse(data)

    events = [
        event("response.created", response=in_progress),
        event("response.in_progress", response=in_progress),
        event(
            "response.output_item.added",
            output_index=0,
            item={**output_item, "status": "in_progress", "content": []},
        ),
        event(
            "response.content_part.added",
            item_id=message_id,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        ),
    ]
    events.extend(
        event(
            "response.output_text.delta",
            item_id=message_id,
            output_index=0,
            content_index=0,
            delta=word,
        )
        for word in _words(text)
    )
    events += [
        event(
            "response.output_text.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            text=text,
        ),
        event(
            "response.content_part.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            part=output_item["content"][0],
        ),
        event("response.output_item.done", output_index=0, item=output_item),
        event("response.completed", response=response),
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
