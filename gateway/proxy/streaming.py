"""Server-sent events: split an upstream byte stream into events, and assemble the record.

The gateway forwards each event as soon as it is whole and, beside it, folds the
chunks into the object the client would have got without `stream: true`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.proxy.spans import error_fields, failure_of
from gateway.proxy.tool_items import as_object, objects_in

# What a failure the upstream reports after its 200 (an error event, `response.failed`, a
# stream cut short) counts as in `upstream_status`: a bad gateway, as if it had answered so.
UPSTREAM_FAILED_STATUS = 502
# The failure of a stream that stopped before it said it was done.
INCOMPLETE = "upstream_stream_incomplete"
RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')


class SSESplitter:
    """Cuts a byte stream into whole events (each ending in a blank line), bytes untouched."""

    def __init__(self) -> None:
        # An unfinished event's bytes, in the pieces they came in, and the last three of them.
        self._parts: list[bytes] = []
        self._edge = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._parts:
            # An event's end can only be in what just came, or straddle it and the three
            # bytes before: a long event is joined once, not copied and searched per read.
            edge = self._edge + chunk
            if b"\n\n" not in edge and b"\r\n\r\n" not in edge:
                self._parts.append(chunk)
                self._edge = edge[-3:]
                return []
            buffer = b"".join((*self._parts, chunk))
        else:
            buffer = chunk
        events: list[bytes] = []
        start = 0
        # Each separator is searched for again only once passed: a chunk of many events is cut
        # in one pass instead of a scan to its end per event (no CRLF in most streams).
        lf = buffer.find(b"\n\n")
        crlf = buffer.find(b"\r\n\r\n")
        while lf >= 0 or crlf >= 0:
            if crlf >= 0 and (lf < 0 or crlf < lf):
                end = crlf + 4
            else:
                end = lf + 2
            events.append(buffer[start:end])
            start = end
            if 0 <= lf < start:
                lf = buffer.find(b"\n\n", start)
            if 0 <= crlf < start:
                crlf = buffer.find(b"\r\n\r\n", start)
        rest = buffer[start:]
        self._parts = [rest] if rest else []
        self._edge = rest[-3:]
        return events

    def rest(self) -> bytes:
        """Bytes after the last whole event (a stream that ended without a blank line)."""
        rest = b"".join(self._parts)
        self._parts, self._edge = [], b""
        return rest


def parse_event(raw: bytes) -> tuple[str | None, bytes]:
    """The `event:` name and the joined `data:` payload of one raw event."""
    name: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", errors="replace")
    return name, b"\n".join(data)


def chunk_failure(chunk: dict[str, Any]) -> tuple[str, str | None] | None:
    """(type, message) of an error chunk (`{"error": {...}}`) in a chat or completion stream."""
    if not isinstance(chunk.get("error"), dict):
        return None
    kind, message = error_fields(chunk)
    return kind or "upstream_stream_error", message


def strip_usage_null(raw: bytes) -> bytes:
    """Remove the `"usage":null` an upstream adds to chunks only because we asked for usage."""
    return _USAGE_NULL.sub(b"", raw)


class _ChoiceChunks:
    """What chat and legacy completion streams share: the first id/model/... seen, the
    usage chunk, an error chunk, and each choice's index and finish reason."""

    META_KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.failed: tuple[str, str | None] | None = None
        # Set by the relay when `data: [DONE]` arrives: the upstream meant to end here.
        self.done = False
        # Each choice's finish reason so far (None while it goes on).
        self.finish: dict[int, Any] = {}

    def failure(self) -> tuple[str, str | None] | None:
        """(type, message) when the stream carried an error chunk, or ended with neither
        `[DONE]` nor a finish reason on every choice (the upstream stopped short)."""
        if self.failed is not None or self.done:
            return self.failed
        if not self.finish or None in self.finish.values():
            return (
                INCOMPLETE,
                "the upstream's stream ended before [DONE] and before every choice finished",
            )
        return None

    def _choices(self, chunk: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """Take the chunk's shared parts; its choices with their indexes."""
        self.chunks += 1
        self.failed = chunk_failure(chunk) or self.failed
        for key in self.META_KEYS:
            if chunk.get(key) is not None and key not in self.meta:
                self.meta[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = [
            (choice.get("index", 0) if isinstance(choice.get("index", 0), int) else 0, choice)
            for choice in objects_in(chunk.get("choices"))
        ]
        for index, choice in choices:
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]
            else:
                self.finish.setdefault(index, None)
        return choices


class ChatAssembler(_ChoiceChunks):
    """Folds `chat.completion.chunk` events into one `chat.completion` object."""

    META_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")

    def __init__(self) -> None:
        super().__init__()
        self.choices: dict[int, dict[str, Any]] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        for index, choice in self._choices(chunk):
            slot = self.choices.setdefault(index, {"role": None, "tool_calls": {}})
            delta = as_object(choice.get("delta"))
            if isinstance(delta.get("role"), str):
                slot["role"] = delta["role"]
            for field in _JOINED_DELTA_TEXT:
                piece = delta.get(field)
                if isinstance(piece, str):
                    slot.setdefault(field, []).append(piece)
            for call in objects_in(delta.get("tool_calls")):
                calls = slot["tool_calls"]
                position = _tool_call_position(calls, call)
                _add_tool_call_delta(calls.setdefault(position, {"id": None}), call)
            if choice.get("logprobs") is not None:
                slot.setdefault("logprobs", []).append(choice["logprobs"])

    def result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            message: dict[str, Any] = {
                "role": slot["role"] or "assistant",
                "content": "".join(slot["content"]) if "content" in slot else None,
            }
            for field in _JOINED_DELTA_TEXT[1:]:
                if field in slot:
                    message[field] = "".join(slot[field])
            if slot["tool_calls"]:
                message["tool_calls"] = [
                    _whole_tool_call(slot["tool_calls"][i]) for i in sorted(slot["tool_calls"])
                ]
            choices.append(
                {"index": index, "message": message, "finish_reason": self.finish.get(index)}
            )
        return {
            "id": self.meta.get("id"),
            "object": "chat.completion",
            "created": self.meta.get("created"),
            "model": self.meta.get("model"),
            **(
                {"system_fingerprint": self.meta["system_fingerprint"]}
                if "system_fingerprint" in self.meta
                else {}
            ),
            "choices": choices,
            "usage": self.usage,
        }


# A chat delta's text fields joined across chunks: the answer, a refusal, and the reasoning
# that vLLM, SGLang and DeepSeek stream beside it (kept as the plain answer keeps it).
_JOINED_DELTA_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


def _tool_call_position(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> int:
    """Where a streamed tool-call delta belongs: its `index`; with none (as Gemini streams
    parallel calls, each whole), the last call, unless the delta names a new id."""
    index = delta.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if not calls:
        return 0
    last = max(calls)
    known = calls[last].get("id")
    if delta.get("id") and known and delta["id"] != known:
        return last + 1
    return last


# The text fields of a chat tool call's body that arrive in pieces, per call type.
_STREAMED_TEXT = {"function": ("name", "arguments"), "custom": ("name", "input")}


def _add_tool_call_delta(target: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold one streamed tool-call delta into its call: `function` (name, arguments) and
    `custom` (name, input) text is joined; any other type's body is kept as last sent."""
    if delta.get("id"):
        target["id"] = delta["id"]
    if delta.get("type"):
        target["type"] = delta["type"]
    for key, value in delta.items():
        if key in ("index", "id", "type") or not isinstance(value, dict):
            continue
        body = target.setdefault(key, {})
        for field, piece in value.items():
            joined = body.get(field, "")
            if field in _STREAMED_TEXT.get(key, ()) and isinstance(piece, str):
                # Text joins text; after a piece that was not text (a malformed upstream), the
                # new piece starts over rather than fail the relay.
                body[field] = joined + piece if isinstance(joined, str) else piece
            else:
                body[field] = piece


def _whole_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An assembled tool call as a plain answer has it: a function call unless said otherwise."""
    kind = call.get("type") or ("custom" if "custom" in call else "function")
    whole = {"id": call.get("id"), **call, "type": kind}
    if kind == "function":
        function = as_object(whole.get("function"))
        whole["function"] = {"name": function.get("name", ""), **function}
        whole["function"].setdefault("arguments", "")
    return whole


class CompletionAssembler(_ChoiceChunks):
    """Folds legacy `text_completion` chunks into one completion object."""

    META_KEYS = ("id", "created", "model", "system_fingerprint")

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[int, list[str]] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        for index, choice in self._choices(chunk):
            text = choice.get("text")
            self.texts.setdefault(index, []).append(text if isinstance(text, str) else "")

    def result(self) -> dict[str, Any]:
        return {
            "id": self.meta.get("id"),
            "object": "text_completion",
            "created": self.meta.get("created"),
            "model": self.meta.get("model"),
            "choices": [
                {"index": i, "text": "".join(self.texts[i]), "finish_reason": self.finish.get(i)}
                for i in sorted(self.texts)
            ],
            "usage": self.usage,
        }


class ResponsesAssembler:
    """Keeps the final response object of a Responses API event stream, and how it ended.

    The terminal event (`response.completed`, `.failed`, `.incomplete`) carries the whole
    object; until then the items finished so far are kept, so a stream cut short still
    shows them. Items of types this gateway does not know are kept as they came.
    """

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.text: list[str] = []
        self.items: dict[int, dict[str, Any]] = {}
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.ended = False
        self.failed: tuple[str, str | None] | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.chunks += 1
        kind = event.get("type", "")
        if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self.text.append(event["delta"])
        elif kind in ("response.output_item.added", "response.output_item.done"):
            index = event.get("output_index")
            if isinstance(index, int) and isinstance(event.get("item"), dict):
                self.items[index] = event["item"]
        elif kind == "error":
            # Flat (`code`, `message`), as OpenAI sends it; nested under `error` elsewhere.
            error = as_object(event.get("error")) or event
            code = error.get("code") or error.get("type")
            self.failed = (
                str(code) if code and code != "error" else "upstream_stream_error",
                str(error.get("message") or "") or None,
            )
        response = event.get("response")
        if isinstance(response, dict):
            self.response = response
            if response.get("usage"):
                self.usage = response["usage"]
        if kind in RESPONSES_TERMINAL:
            self.ended = True
            self.failed = failure_of("responses", response) or self.failed

    def failure(self) -> tuple[str, str | None] | None:
        """(type, message) when the stream ended in an error: an `error` event,
        `response.failed`, or no terminal event at all (the upstream stopped short)."""
        if self.failed is not None:
            return self.failed
        if not self.ended:
            return (INCOMPLETE, "the upstream's Responses stream ended before its terminal event")
        return None

    def result(self) -> dict[str, Any]:
        response: dict[str, Any] = self.response or {"object": "response", "status": "incomplete"}
        if self.response is None and self.text:
            response["output_text"] = "".join(self.text)
        if self.items and not response.get("output"):
            response = {**response, "output": [self.items[i] for i in sorted(self.items)]}
        if self.failed is not None and response.get("status") != "failed":
            kind, message = self.failed
            response = {**response, "status": "failed", "error": {"code": kind, "message": message}}
        return response


Assembler = ChatAssembler | CompletionAssembler | ResponsesAssembler


def new_assembler(operation: str) -> Assembler:
    if operation == "chat":
        return ChatAssembler()
    if operation == "text_completion":
        return CompletionAssembler()
    return ResponsesAssembler()


def loads_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def has_token(operation: str, obj: dict[str, Any]) -> bool:
    """Whether a stream event carries the first token (for time to first token)."""
    if operation == "responses":
        return str(obj.get("type", "")).endswith(".delta")
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") if operation == "chat" else choice
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("text")
        ):
            return True
    return False
