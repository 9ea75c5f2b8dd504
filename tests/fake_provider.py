"""A fake OpenAI-compatible upstream that speaks the real wire format, so gateway tests and
benchmarks exercise actual HTTP, SSE framing and failure modes without a paid provider."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.policy
import hashlib
import itertools
import math
import re
import signal
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from email.parser import BytesParser
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web

JSON = dict[str, Any]

# Replies are "echo: " + the last user text cut to this many characters, so a test can predict
# the exact reply while a huge prompt cannot blow up the response size.
ECHO_LIMIT = 200
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
DEFAULT_EMBEDDING_DIMENSIONS = 16
SYSTEM_FINGERPRINT = "fp_fakeprov"
# Tool-call arguments are streamed in slices this long, mimicking token-sized fragments.
ARGUMENT_FRAGMENT_CHARS = 8

_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to access this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out."),
    409: ("invalid_request_error", "conflict", "Conflict."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "overloaded", "The engine is currently overloaded."),
    504: ("server_error", "timeout", "Gateway timeout."),
}


@dataclass
class Fault:
    """One planned misbehaviour, consumed by exactly one /v1 request.

    Precedence when several fields are set: ``delay`` always happens first, then ``reset``,
    then ``status``/``body`` (an error reply), otherwise the normal reply is sent with
    ``malformed``, ``truncate_after`` and ``chunk_delay`` applied to it.
    """

    status: int | None = None
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Raw body sent instead of the OpenAI error JSON (e.g. an HTML page from a proxy).
    body: str | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    reset: bool = False
    truncate_after: int | None = None
    malformed: bool = False
    # Reply (plain or streamed) with the JSON of the request headers received as the text, as
    # a careless upstream might echo a key back.
    echo_headers: bool = False
    # A 200 answer of this many bytes, sent in 1 MiB pieces without a Content-Length (so
    # neither side can tell its size up front), and never held in memory whole.
    huge_body: int | None = None
    # A stream that never ends: one ~1 KB chat chunk every `chunk_delay` until the caller leaves.
    endless: bool = False
    # How a Responses answer ends instead of `completed`: "failed" (`response.failed`, the
    # error from `code`/`message`), "incomplete" (`response.incomplete`, max_output_tokens),
    # or "error" (streams: an `error` event, then nothing more).
    responses_end: str | None = None
    # Scripted tool calls: chat answers carry exactly these `tool_calls` (function, custom,
    # any type; streamed as deltas), Responses answers exactly these `output` items.
    tool_calls: list[JSON] | None = None
    output_items: list[JSON] | None = None

    @classmethod
    def from_dict(cls, data: JSON) -> Fault:
        """Build from the JSON accepted by ``POST /_fault`` (``type`` is an alias of
        ``error_type``); unknown keys raise ValueError so typos do not silently no-op."""
        data = dict(data)
        if "type" in data:
            data["error_type"] = data.pop("type")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> JSON:
        return asdict(self)


@dataclass
class RecordedRequest:
    """What the upstream saw. Header names are lower-cased because HTTP clients disagree on
    case and tests should not depend on it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    at: float
    # Set when a write to the client failed, i.e. the caller hung up mid-response.
    disconnected: bool = False
    # The caller's (host, port): one per connection, so tests can see a connection reused.
    peer: Any = None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def to_dict(self) -> JSON:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
            "at": self.at,
            "disconnected": self.disconnected,
        }


class FakeProviderState:
    """Mutable knobs and observations shared between the app and the test.

    Thread-safe because ``FakeProviderThread`` serves from another thread than the test's.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        models: Iterable[str] = DEFAULT_MODELS,
        api_key: str | None = None,
        keep_requests: int | None = None,
    ) -> None:
        self.latency = latency
        # Recorded requests kept (None: all). A benchmark's upstream keeps a few: a list grown by
        # every request made each garbage collection longer, and later runs' p99 with it.
        self.keep_requests = keep_requests
        self.models: list[str] = list(models)
        # When set, requests must carry "Authorization: Bearer <api_key>" or get a 401.
        self.api_key = api_key
        # vLLM-like: honour `return_token_ids` (prompt and completion token ids).
        self.vllm = False
        # Request fields this upstream refuses with a 400 on every request, as servers that
        # reject unknown arguments do (`stream_options` on some vLLM and Azure versions).
        self.rejected_fields: set[str] = set()
        # Responses made, with the request that made them, for GET /v1/responses/{id}.
        self.responses: dict[str, tuple[JSON, JSON]] = {}
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._cond = threading.Condition()
        self._ids: dict[str, itertools.count[int]] = {}

    def add_fault(self, fault: Fault | None = None, /, *, times: int = 1, **fields: Any) -> None:
        """Queue ``fault`` (or ``Fault(**fields)``) for the next ``times`` requests."""
        if fault is None:
            fault = Fault(**fields)
        elif fields:
            raise TypeError("pass either a Fault or keyword fields, not both")
        with self._cond:
            self._faults.extend(fault for _ in range(times))

    def next_fault(self) -> Fault | None:
        with self._cond:
            return self._faults.popleft() if self._faults else None

    @property
    def pending_faults(self) -> list[Fault]:
        with self._cond:
            return list(self._faults)

    def record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(rec)
            keep = self.keep_requests
            if keep is not None and len(self.requests) > 2 * keep:
                del self.requests[:-keep]
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget requests, pending faults and rejected fields; latency, models and api_key are
        kept."""
        with self._cond:
            self.requests.clear()
            self._faults.clear()
            self.rejected_fields.clear()
            self.responses.clear()

    def snapshot(self) -> list[RecordedRequest]:
        """A copy of the requests so far, safe to iterate while the server keeps recording."""
        with self._cond:
            return list(self.requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self._cond:
            return [r for r in self.requests if r.path == path]

    @property
    def last_request(self) -> RecordedRequest:
        with self._cond:
            if not self.requests:
                raise LookupError("the fake provider has not received any request")
            return self.requests[-1]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``count`` requests arrived. Only call from a thread other than the
        server's loop (e.g. with FakeProviderThread), otherwise it deadlocks."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"got {len(self.requests)} requests, wanted {count}")
            return list(self.requests)

    async def wait_for_requests_async(
        self, count: int, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Like wait_for_requests, for code running on the server's own loop."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(self.requests)} requests, wanted {count}")
            await asyncio.sleep(0.005)
        with self._cond:
            return list(self.requests)

    def next_id(self, prefix: str) -> str:
        # Per-prefix counters rather than random ids keep runs reproducible and ids easy to
        # eyeball: the first chat completion is always chatcmpl-...0001.
        with self._cond:
            counter = self._ids.setdefault(prefix, itertools.count(1))
            return f"{prefix}{next(counter):024d}"


STATE_KEY = web.AppKey("fake_provider_state", FakeProviderState)


# ---------------------------------------------------------------------------------------------
# Deterministic content helpers, public so tests can compute what to expect.


def content_text(content: Any) -> str:
    """Text of a chat/responses ``content``: a string, or the text parts of a list joined by
    a space (images and other parts contribute nothing)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return str(content)


def message_text(message: JSON) -> str:
    """All the text a message carries: content plus any tool-call names and arguments."""
    text = content_text(message.get("content"))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        text += str(fn.get("name", "")) + str(fn.get("arguments", ""))
    return text


def count_prompt_tokens(texts: Iterable[str]) -> int:
    return sum(len(t) for t in texts) // 4 + 1


def count_completion_tokens(text: str) -> int:
    return len(text.split())


def echo_reply(user_text: str) -> str:
    # strip() makes the word-split chunks concatenate back to exactly the reply.
    return ("echo: " + user_text[:ECHO_LIMIT]).strip()


def chat_reply_text(messages: Sequence[JSON]) -> str:
    """The assistant reply for a chat request: ``echo: <last user message text>``."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return echo_reply(content_text(message.get("content")))
    return echo_reply("")


def token_id(piece: str) -> int:
    """The fake tokenizer: a word's id, stable across runs."""
    return int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=4).digest(), "big") % 50_000


def token_logprob(piece: str) -> float:
    """The fake model's logprob of a word: exact in float32, so tests compare with ==."""
    return -((token_id(piece) % 64) + 1) / 64


def prompt_token_ids(messages: Sequence[JSON]) -> list[int]:
    """Token ids of a chat prompt: one per word of each message's text, in order."""
    return [token_id(word) for m in messages for word in message_text(m).split()]


def _logprob_entry(piece: str, top: int) -> JSON:
    entry: JSON = {
        "token": piece,
        "logprob": token_logprob(piece),
        "bytes": list(piece.encode()),
        "top_logprobs": [],
    }
    if top:
        entry["top_logprobs"] = [{"token": piece, "logprob": token_logprob(piece), "bytes": None}]
    return entry


def split_words(text: str) -> list[str]:
    """Stream pieces: each word with its leading whitespace, like OpenAI's tokens."""
    return re.findall(r"\s*\S+", text)


def example_value(schema: JSON) -> Any:
    """A simple value valid for a JSON schema (enum/const/default win, then by type)."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        return example_arguments(schema)
    if kind == "array":
        items = schema.get("items")
        return [example_value(items)] if isinstance(items, dict) else []
    simple: dict[str, Any] = {
        "string": "test",
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "null": None,
    }
    return simple.get(kind, "test")


def example_arguments(schema: JSON | None) -> JSON:
    """Tool-call arguments for a parameters schema: only required properties are filled."""
    if not schema:
        return {}
    props: JSON = schema.get("properties") or {}
    return {name: example_value(props.get(name) or {}) for name in schema.get("required") or []}


def structured_reply(body: JSON) -> str | None:
    """JSON for a requested schema (chat `response_format`, Responses `text.format`), else None."""
    form = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if form.get("type") != "json_schema":
        return None
    schema = form.get("schema") or (form.get("json_schema") or {}).get("schema") or {}
    return dumps_arguments(example_value(schema))


def dumps_arguments(arguments: JSON) -> str:
    return orjson.dumps(arguments).decode()


def embedding_for(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector derived from sha256 of the text, so equal inputs embed equally."""
    raw = b""
    counter = 0
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dimensions}I", raw[: dimensions * 4])
    values = [i / 0xFFFFFFFF * 2.0 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Rounded through float32 so the float and base64 encodings decode to the same numbers.
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _responses_usage(input_tokens: int, output_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _limit_words(reply: str, max_tokens: Any) -> tuple[str, str]:
    """Apply max_tokens as a word budget, returning (reply, finish_reason)."""
    pieces = split_words(reply)
    if isinstance(max_tokens, int) and 0 <= max_tokens < len(pieces):
        return "".join(pieces[:max_tokens]), "length"
    return reply, "stop"


# ---------------------------------------------------------------------------------------------
# Wire helpers.


def _sse(payload: JSON, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(obj),
        content_type="application/json",
        headers=headers,
    )


def _error_body(
    status: int,
    message: str | None = None,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSON:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    default_type, default_code, default_message = _ERROR_DEFAULTS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, phrase)
    )
    return {
        "error": {
            "message": message if message is not None else default_message,
            "type": error_type if error_type is not None else default_type,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }


def _error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> web.Response:
    return _json_response(_error_body(status, message, error_type, code, param), status)


@dataclass
class _Call:
    request: web.Request
    state: FakeProviderState
    body: JSON
    fault: Fault | None
    record: RecordedRequest
    request_id: str

    @property
    def base_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}


def _drop_connection(request: web.Request, *, hard: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if hard:
        # SO_LINGER 0 turns close into a TCP RST, the "connection reset by peer" clients see
        # from a crashing upstream; a plain close would look like a clean EOF.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        # close() flushes what was already written, so the client gets a partial body.
        transport.close()


def _corrupt(event: bytes) -> bytes:
    """Cut the JSON of an SSE event in half so it no longer parses."""
    at = event.find(b"data: ") + len(b"data: ")
    data = event[at:].rstrip(b"\n")
    return event[:at] + data[: max(1, len(data) // 2)] + b"\n\n"


async def _reply_json(call: _Call, obj: JSON) -> web.StreamResponse:
    fault = call.fault
    payload = orjson.dumps(obj)
    if fault is not None and fault.malformed:
        payload = payload[: len(payload) // 2]
    if fault is not None and fault.truncate_after is not None:
        # Declare the full length but send only half, then hang up.
        resp = web.StreamResponse(status=200, headers=call.base_headers)
        resp.content_type = "application/json"
        resp.content_length = len(payload)
        try:
            await resp.prepare(call.request)
            await resp.write(payload[: len(payload) // 2])
        except ConnectionError:
            call.record.disconnected = True
            return resp
        _drop_connection(call.request, hard=False)
        return resp
    return web.Response(
        status=200, body=payload, content_type="application/json", headers=call.base_headers
    )


async def _reply_stream(call: _Call, events: list[bytes]) -> web.StreamResponse:
    fault = call.fault
    if fault is not None and fault.malformed and events:
        events = [_corrupt(events[0]), *events[1:]]
    chunk_delay = fault.chunk_delay if fault is not None else 0.0
    truncate_after = fault.truncate_after if fault is not None else None
    resp = web.StreamResponse(
        status=200,
        headers={
            **call.base_headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        },
    )
    try:
        await resp.prepare(call.request)
        for index, event in enumerate(events):
            if truncate_after is not None and index >= truncate_after:
                break
            if index and chunk_delay > 0:
                await asyncio.sleep(chunk_delay)
            # One write per event so a client can observe the chunking.
            await resp.write(event)
    except ConnectionError:
        call.record.disconnected = True
        return resp
    if truncate_after is not None:
        _drop_connection(call.request, hard=False)
    return resp


HUGE_PIECE = 1024 * 1024


async def _reply_huge(call: _Call, size: int) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers=call.base_headers)
    resp.content_type = "application/json"
    resp.enable_chunked_encoding()
    head = b'{"id":"huge","object":"chat.completion","pad":"'
    piece = b"x" * HUGE_PIECE
    try:
        await resp.prepare(call.request)
        await resp.write(head)
        sent = len(head)
        while sent < size:
            await resp.write(piece)
            sent += len(piece)
        await resp.write(b'"}')
        await resp.write_eof()
    except ConnectionError:
        call.record.disconnected = True
    return resp


async def _reply_endless(call: _Call, chunk_delay: float) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200, headers={**call.base_headers, "Content-Type": "text/event-stream"}
    )
    event = _sse(
        {
            "id": "chatcmpl-endless",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "endless",
            "choices": [{"index": 0, "delta": {"content": "more " * 200}, "finish_reason": None}],
        }
    )
    try:
        await resp.prepare(call.request)
        while True:
            await resp.write(event)
            # Yields even with no delay, so the fake's other connections keep being served.
            await asyncio.sleep(chunk_delay)
    except ConnectionError:
        call.record.disconnected = True
    return resp


def _fault_response(call: _Call, fault: Fault) -> web.Response:
    status = fault.status if fault.status is not None else 200
    headers = {**call.base_headers, **fault.headers}
    if fault.body is not None:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        return web.Response(status=status, body=fault.body.encode(), headers=headers)
    body = _error_body(status, fault.message, fault.error_type, fault.code, fault.param)
    return _json_response(body, status, headers)


Handler = Callable[[_Call], Awaitable[web.StreamResponse]]


def _provider_route(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Shared front half of every /v1 route: record, wait, inject faults, authenticate, parse."""

    async def route(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        raw = await request.read()
        parsed: Any = None
        parse_failed = False
        if raw and request.content_type == "multipart/form-data":
            parsed = form_fields(raw, request.headers["Content-Type"])
        elif raw:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parse_failed = True
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=parsed,
            raw_body=raw,
            at=time.time(),
            peer=request.transport.get_extra_info("peername") if request.transport else None,
        )
        state.record(rec)
        fault = state.next_fault()
        delay = state.latency + (fault.delay if fault is not None else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        call = _Call(request, state, {}, fault, rec, state.next_id("req_"))
        if fault is not None:
            if fault.reset:
                _drop_connection(request, hard=True)
                # Never delivered: aiohttp notices the closed transport and discards it.
                return web.Response()
            if fault.status is not None or fault.body is not None:
                return _fault_response(call, fault)
            if fault.huge_body is not None:
                return await _reply_huge(call, fault.huge_body)
            if fault.endless:
                return await _reply_endless(call, fault.chunk_delay)
        if state.api_key is not None and (rec.header("authorization") != f"Bearer {state.api_key}"):
            return _error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        if parse_failed:
            return _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
            )
        bodyless = request.path.endswith("/cancel")
        if request.method == "POST" and not isinstance(parsed, dict) and not bodyless:
            return _error_response(400, "The request body must be a JSON object.")
        for name in sorted(state.rejected_fields & set(parsed or ())):
            return _error_response(400, f"Unrecognized request argument supplied: {name}")
        call.body = parsed if isinstance(parsed, dict) else {}
        return await handler(call)

    return route


def _require(body: JSON, name: str) -> web.Response | None:
    if body.get(name) is None:
        return _error_response(
            400,
            f"you must provide a {name} parameter",
            param=name,
            code="missing_required_parameter",
        )
    return None


# ---------------------------------------------------------------------------------------------
# Endpoints.


def _pick_chat_tool(body: JSON) -> JSON | None:
    tools = [t for t in body.get("tools") or [] if t.get("type", "function") == "function"]
    messages = body.get("messages") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        for tool in tools:
            if (tool.get("function") or {}).get("name") == wanted:
                return tool["function"]
    return tools[0].get("function") or {}


async def _chat_completions(call: _Call) -> web.StreamResponse:
    body = call.body
    for name in ("model", "messages"):
        if (missing := _require(body, name)) is not None:
            return missing
    model = body["model"]
    messages: list[JSON] = body["messages"]
    stream = bool(body.get("stream"))
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    completion_id = call.state.next_id("chatcmpl-")
    created = int(time.time())
    prompt_tokens = count_prompt_tokens(message_text(m) for m in messages)
    tool = _pick_chat_tool(body)
    want_ids = call.state.vllm and body.get("return_token_ids") is True
    want_logprobs = body.get("logprobs") is True
    top_logprobs = int(body.get("top_logprobs") or 0)

    reply: str | None = None
    tool_calls: list[JSON] = []
    if call.fault is not None and call.fault.echo_headers:
        reply, finish_reason = orjson.dumps(call.record.headers).decode(), "stop"
        completion_tokens = count_completion_tokens(reply)
    elif call.fault is not None and call.fault.tool_calls is not None:
        tool_calls, finish_reason = call.fault.tool_calls, "tool_calls"
        completion_tokens = len(orjson.dumps(tool_calls)) // 4 + 1
    elif tool is not None:
        arguments = dumps_arguments(example_arguments(tool.get("parameters")))
        name = str(tool.get("name", ""))
        tool_calls = [
            {
                "id": call.state.next_id("call_"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
        finish_reason = "tool_calls"
        completion_tokens = len(name + arguments) // 4 + 1
    else:
        reply, finish_reason = _limit_words(
            structured_reply(body) or chat_reply_text(messages),
            body.get("max_completion_tokens", body.get("max_tokens")),
        )
        completion_tokens = count_completion_tokens(reply)
    usage = _chat_usage(prompt_tokens, completion_tokens)

    if not stream:
        message: JSON = {
            "role": "assistant",
            "content": reply,
            "refusal": None,
            "annotations": [],
        }
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice: JSON = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        answer: JSON = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        pieces = split_words(reply or "")
        if want_logprobs:
            choice["logprobs"] = {"content": [_logprob_entry(p, top_logprobs) for p in pieces]}
        if want_ids:
            answer["prompt_token_ids"] = prompt_token_ids(messages)
            choice["token_ids"] = [token_id(p) for p in pieces]
        return await _reply_json(call, answer)

    def chunk(delta: JSON, finish: str | None = None, **extra: Any) -> bytes:
        choice: JSON = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        piece = delta.get("content")
        if piece and want_logprobs:
            choice["logprobs"] = {"content": [_logprob_entry(piece, top_logprobs)]}
        if want_ids:
            choice["token_ids"] = [token_id(piece)] if piece else []
        payload: JSON = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            **extra,
            "choices": [choice],
        }
        # OpenAI only adds the key at all when include_usage was requested.
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    events: list[bytes] = []
    if tool_calls:
        deltas = [d for i, tc in enumerate(tool_calls) for d in _tool_call_deltas(i, tc)]
        deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
        events.extend(chunk(delta) for delta in deltas)
    else:
        first: JSON = {"prompt_token_ids": prompt_token_ids(messages)} if want_ids else {}
        events.append(chunk({"role": "assistant", "content": ""}, **first))
        events.extend(chunk({"content": piece}) for piece in split_words(reply or ""))
    events.append(chunk({}, finish_reason))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "service_tier": "default",
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(_DONE)
    return await _reply_stream(call, events)


# The field of a chat tool call's body that streams in fragments, by call type.
_STREAMED_FIELD = {"function": "arguments", "custom": "input"}


def _tool_call_deltas(index: int, tool_call: JSON) -> list[JSON]:
    """A chat tool call as a stream sends it: id, type and name first, then its arguments
    (a custom tool's input) in fragments; a type without a streamed field comes whole."""
    kind = str(tool_call.get("type", "function"))
    body = dict(tool_call.get(kind) or {})
    field_name = _STREAMED_FIELD.get(kind)
    text = str(body.pop(field_name, "")) if field_name else ""
    if field_name:
        body[field_name] = ""
    deltas: list[JSON] = [
        {"tool_calls": [{"index": index, "id": tool_call.get("id"), "type": kind, kind: body}]}
    ]
    for start in range(0, len(text), ARGUMENT_FRAGMENT_CHARS):
        fragment = text[start : start + ARGUMENT_FRAGMENT_CHARS]
        deltas.append({"tool_calls": [{"index": index, kind: {field_name: fragment}}]})
    return deltas


def _prompt_text(prompt: Any) -> str:
    """Legacy completions accept a string, a list of strings, or token arrays."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):
            return " ".join(str(t) for t in prompt)
        if isinstance(first, list):
            return " ".join(str(t) for t in first)
    return ""


async def _completions(call: _Call) -> web.StreamResponse:
    body = call.body
    for name in ("model", "prompt"):
        if (missing := _require(body, name)) is not None:
            return missing
    model = body["model"]
    prompt = _prompt_text(body["prompt"])
    stream = bool(body.get("stream"))
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    completion_id = call.state.next_id("cmpl-")
    created = int(time.time())
    reply, finish_reason = _limit_words(echo_reply(prompt), body.get("max_tokens"))
    prompt_tokens = count_prompt_tokens([prompt])
    completion_tokens = count_completion_tokens(reply)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if not stream:
        return await _reply_json(
            call,
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"text": reply, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": usage,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            },
        )

    def chunk(choices: list[JSON], chunk_usage: JSON | None = None) -> bytes:
        payload: JSON = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if include_usage:
            payload["usage"] = chunk_usage
        return _sse(payload)

    def choice(text: str, finish: str | None) -> JSON:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    events = [chunk([choice(piece, None)]) for piece in split_words(reply)]
    events.append(chunk([choice("", finish_reason)]))
    if include_usage:
        events.append(chunk([], usage))
    events.append(_DONE)
    return await _reply_stream(call, events)


async def _embeddings(call: _Call) -> web.StreamResponse:
    body = call.body
    for name in ("model", "input"):
        if (missing := _require(body, name)) is not None:
            return missing
    raw_input = body["input"]
    # A flat list of ints is one tokenized input, not many inputs.
    if isinstance(raw_input, str) or (
        isinstance(raw_input, list) and raw_input and isinstance(raw_input[0], int)
    ):
        inputs: list[Any] = [raw_input]
    else:
        inputs = list(raw_input)
    dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    use_base64 = body.get("encoding_format") == "base64"
    data: list[JSON] = []
    prompt_tokens = 0
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            text = item
            prompt_tokens += len(item) // 4 + 1
        else:
            text = " ".join(str(t) for t in item)
            prompt_tokens += len(item)
        vector = embedding_for(text, dimensions)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if use_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return await _reply_json(
        call,
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
    )


def _responses_messages(body: JSON) -> list[JSON]:
    """Normalise Responses ``input`` into chat-like messages for the shared helpers."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    messages: list[JSON] = []
    for item in raw or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" or "role" in item:
            messages.append({"role": item.get("role", "user"), "content": item.get("content")})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", ""))})
        elif kind == "function_call":
            messages.append(
                {
                    "role": "assistant",
                    "content": f"{item.get('name', '')}{item.get('arguments', '')}",
                }
            )
    return messages


def _pick_responses_tool(body: JSON, messages: list[JSON]) -> JSON | None:
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or (messages and messages[-1]["role"] == "tool"):
        return None
    if isinstance(choice, dict) and choice.get("name"):
        for tool in tools:
            if tool.get("name") == choice["name"]:
                return tool
    return tools[0]


async def _responses(call: _Call) -> web.StreamResponse:
    body = call.body
    for name in ("model", "input"):
        if (missing := _require(body, name)) is not None:
            return missing
    messages = _responses_messages(body)
    stream = bool(body.get("stream"))
    response_id = call.state.next_id("resp_")
    created = int(time.time())
    instructions = body.get("instructions")
    input_tokens = count_prompt_tokens(
        [content_text(instructions), *(content_text(m["content"]) for m in messages)]
    )
    tool = _pick_responses_tool(body, messages)
    item_id = call.state.next_id("fc_" if tool is not None else "msg_")

    final_item: JSON
    reply = ""
    arguments = ""
    if tool is not None:
        arguments = dumps_arguments(example_arguments(tool.get("parameters")))
        final_item = {
            "type": "function_call",
            "id": item_id,
            "call_id": call.state.next_id("call_"),
            "name": tool.get("name", ""),
            "arguments": arguments,
            "status": "completed",
        }
        output_tokens = len(str(tool.get("name", "")) + arguments) // 4 + 1
    else:
        reply = structured_reply(body) or chat_reply_text(messages)
        final_item = {
            "type": "message",
            "id": item_id,
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": reply, "annotations": [], "logprobs": []}],
        }
        output_tokens = count_completion_tokens(reply)

    def response_object(status: str, output: list[JSON], usage: JSON | None) -> JSON:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": instructions,
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    fault = call.fault
    scripted = fault.output_items if fault is not None else None
    end = fault.responses_end if fault is not None else None
    final = response_object(
        "completed",
        [final_item] if scripted is None else scripted,
        _responses_usage(input_tokens, output_tokens),
    )
    if end in ("failed", "error"):
        final["status"] = "failed"
        final["error"] = {
            "code": (fault.code if fault else None) or "server_error",
            "message": (fault.message if fault else None) or "The model failed to respond.",
        }
    elif end == "incomplete":
        final["status"] = "incomplete"
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    call.state.responses[response_id] = (final, body)
    if not stream:
        return await _reply_json(call, final)

    sequence = itertools.count()

    def event(kind: str, **payload: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(sequence), **payload}, event=kind)

    pending = response_object("in_progress", [], None)
    where: JSON = {"item_id": item_id, "output_index": 0}
    events = [
        event("response.created", response=pending),
        event("response.in_progress", response=pending),
    ]
    if scripted is not None:
        for index, item in enumerate(scripted):
            events.append(event("response.output_item.added", output_index=index, item=item))
            events.append(event("response.output_item.done", output_index=index, item=item))
    elif tool is not None:
        events.append(
            event(
                "response.output_item.added",
                output_index=0,
                item={**final_item, "arguments": "", "status": "in_progress"},
            )
        )
        for start in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS):
            events.append(
                event(
                    "response.function_call_arguments.delta",
                    **where,
                    delta=arguments[start : start + ARGUMENT_FRAGMENT_CHARS],
                )
            )
        events.append(event("response.function_call_arguments.done", **where, arguments=arguments))
    else:
        where["content_index"] = 0
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events.append(
            event(
                "response.output_item.added",
                output_index=0,
                item={**final_item, "status": "in_progress", "content": []},
            )
        )
        events.append(event("response.content_part.added", **where, part=empty_part))
        events.extend(
            event("response.output_text.delta", **where, delta=piece, logprobs=[])
            for piece in split_words(reply)
        )
        events.append(event("response.output_text.done", **where, text=reply, logprobs=[]))
        events.append(
            event("response.content_part.done", **where, part={**empty_part, "text": reply})
        )
    if scripted is None:
        events.append(event("response.output_item.done", output_index=0, item=final_item))
    # The Responses API ends with response.completed; unlike chat there is no [DONE].
    if end == "error":
        error = final["error"]
        events.append(event("error", code=error["code"], message=error["message"], param=None))
    elif end in ("failed", "incomplete"):
        events.append(event(f"response.{end}", response=final))
    else:
        events.append(event("response.completed", response=final))
    return await _reply_stream(call, events)


async def _list_models(call: _Call) -> web.StreamResponse:
    return await _reply_json(
        call,
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}
                for m in call.state.models
            ],
        },
    )


async def _get_model(call: _Call) -> web.StreamResponse:
    model = call.request.match_info["model"]
    if model not in call.state.models:
        return _error_response(
            404, f"The model '{model}' does not exist", param="model", code="model_not_found"
        )
    return await _reply_json(
        call, {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}
    )


def form_fields(raw: bytes, content_type: str) -> JSON:
    """A multipart body's fields: text as strings, files as `{filename, content_type, size,
    sha256}` (so a test can tell the bytes arrived intact)."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields: JSON = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            fields[str(name)] = content.decode()
        else:
            fields[str(name)] = {
                "filename": filename,
                "content_type": part.get_content_type(),
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
            }
    return fields


async def _moderations(call: _Call) -> web.StreamResponse:
    texts = call.body.get("input")
    texts = texts if isinstance(texts, list) else [texts]
    results = [
        {
            "flagged": "flag me" in str(text),
            "categories": {"violence": "flag me" in str(text)},
            "category_scores": {"violence": 0.9 if "flag me" in str(text) else 0.001},
        }
        for text in texts
    ]
    model = call.body.get("model", "omni-moderation-latest")
    return await _reply_json(
        call, {"id": call.state.next_id("modr-"), "model": model, "results": results}
    )


# A WAV header for 0 samples: the smallest valid audio file.
EMPTY_WAV = b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00\x80>\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00"


async def _speech(call: _Call) -> web.StreamResponse:
    for name in ("model", "input", "voice"):
        if (missing := _require(call.body, name)) is not None:
            return missing
    audio = EMPTY_WAV + b"\x00\x00" * len(str(call.body["input"]))
    return web.Response(body=audio, content_type="audio/wav", headers=call.base_headers)


async def _transcription(call: _Call) -> web.StreamResponse:
    for name in ("model", "file"):
        if (missing := _require(call.body, name)) is not None:
            return missing
    file = call.body["file"]
    text = f"heard {file['size']} bytes of {file['filename']}"
    if call.body.get("response_format") == "text":
        return web.Response(text=text, content_type="text/plain", headers=call.base_headers)
    return await _reply_json(call, {"text": text})


# A 1x1 PNG, base64: what every generated image looks like here.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


async def _images(call: _Call) -> web.StreamResponse:
    count = call.body.get("n") or 1
    data = [{"b64_json": PIXEL} for _ in range(int(count))]
    usage = {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}
    return await _reply_json(call, {"created": int(time.time()), "data": data, "usage": usage})


async def _input_tokens(call: _Call) -> web.StreamResponse:
    messages = _responses_messages(call.body)
    count = count_prompt_tokens(content_text(m["content"]) for m in messages)
    return await _reply_json(call, {"object": "response.input_tokens", "input_tokens": count})


async def _stored_response(call: _Call) -> web.StreamResponse:
    response_id = call.request.match_info["response_id"]
    found = call.state.responses.get(response_id)
    if found is None:
        return _error_response(404, f"Response with id '{response_id}' not found.")
    response, body = found
    path = call.request.path
    if call.request.method == "DELETE":
        del call.state.responses[response_id]
        return await _reply_json(call, {"id": response_id, "object": "response", "deleted": True})
    if path.endswith("/cancel"):
        return await _reply_json(call, {**response, "status": "cancelled"})
    if path.endswith("/input_items"):
        items = [
            {
                "id": f"msg_{index}",
                "type": "message",
                "role": m["role"],
                "content": [{"type": "input_text", "text": content_text(m["content"])}],
            }
            for index, m in enumerate(_responses_messages(body))
        ]
        page = {"object": "list", "data": items, "has_more": False}
        return await _reply_json(
            call, {**page, "first_id": "msg_0", "last_id": f"msg_{len(items) - 1}"}
        )
    return await _reply_json(call, response)


async def _unknown(call: _Call) -> web.StreamResponse:
    return _error_response(
        404,
        f"Invalid URL ({call.request.method} {call.request.path})",
        error_type="invalid_request_error",
    )


# ---------------------------------------------------------------------------------------------
# Control routes, for when the fake runs in another process.


async def _control_fault(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        data = await request.json(loads=orjson.loads)
        items = data if isinstance(data, list) else [data]
        faults = [Fault.from_dict(item) for item in items]
    except (ValueError, TypeError) as exc:
        return _error_response(400, f"bad fault: {exc}")
    for fault in faults:
        state.add_fault(fault)
    return _json_response({"queued": len(state.pending_faults)})


async def _control_reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.reset()
    raw = await request.read()
    if raw:
        # Optional knobs so a benchmark can reconfigure a running fake between scenarios.
        try:
            options = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error_response(400, "reset body must be JSON")
        if "latency" in options:
            state.latency = float(options["latency"])
        if "api_key" in options:
            state.api_key = options["api_key"]
        if "models" in options:
            state.models = list(options["models"])
    return _json_response({"ok": True})


async def _control_requests(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return _json_response([r.to_dict() for r in state.snapshot()])


def create_app(state: FakeProviderState | None = None) -> web.Application:
    # Generous body limit: long-context prompts are part of what the gateway must pass through.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state if state is not None else FakeProviderState()
    app.router.add_post("/v1/chat/completions", _provider_route(_chat_completions))
    app.router.add_post("/v1/completions", _provider_route(_completions))
    app.router.add_post("/v1/embeddings", _provider_route(_embeddings))
    app.router.add_post("/v1/responses", _provider_route(_responses))
    app.router.add_get("/v1/models", _provider_route(_list_models))
    app.router.add_post("/v1/moderations", _provider_route(_moderations))
    app.router.add_post("/v1/audio/speech", _provider_route(_speech))
    app.router.add_post("/v1/audio/transcriptions", _provider_route(_transcription))
    app.router.add_post("/v1/audio/translations", _provider_route(_transcription))
    for kind in ("generations", "edits", "variations"):
        app.router.add_post(f"/v1/images/{kind}", _provider_route(_images))
    app.router.add_post("/v1/responses/input_tokens", _provider_route(_input_tokens))
    stored = "/v1/responses/{response_id}"
    app.router.add_get(stored, _provider_route(_stored_response))
    app.router.add_delete(stored, _provider_route(_stored_response))
    app.router.add_post(stored + "/cancel", _provider_route(_stored_response))
    app.router.add_get(stored + "/input_items", _provider_route(_stored_response))
    app.router.add_get("/v1/models/{model}", _provider_route(_get_model))
    app.router.add_route("*", "/v1/{tail:.*}", _provider_route(_unknown))
    app.router.add_post("/_fault", _control_fault)
    app.router.add_post("/_reset", _control_reset)
    app.router.add_get("/_requests", _control_requests)
    return app


# ---------------------------------------------------------------------------------------------
# Running it.


def _root_url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class FakeProviderServer:
    """A running fake on the current event loop."""

    def __init__(
        self,
        runner: web.AppRunner,
        state: FakeProviderState,
        host: str,
        port: int,
        scheme: str = "http",
    ):
        self.runner = runner
        self.state = state
        self.host = host
        self.port = port
        self.root_url = _root_url(host, port, scheme)
        self.url = self.root_url + "/v1"

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_fake_provider(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    latency: float = 0.0,
    state: FakeProviderState | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> FakeProviderServer:
    if state is None:
        state = FakeProviderState(latency=latency)
    elif latency:
        state.latency = latency
    # No access log (it would dominate benchmark CPU) and a short shutdown grace so a test
    # that leaves a delayed request hanging does not stall teardown for a minute.
    runner = web.AppRunner(create_app(state), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound_port = int(runner.addresses[0][1])
    scheme = "https" if ssl_context is not None else "http"
    return FakeProviderServer(runner, state, host, bound_port, scheme)


class FakeProviderThread:
    """The fake on its own event loop in a daemon thread, for synchronous tests."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        state: FakeProviderState | None = None,
        startup_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self._ssl_context = ssl_context
        self.state = state if state is not None else FakeProviderState(latency=latency)
        if latency:
            self.state.latency = latency
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: FakeProviderServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def server(self) -> FakeProviderServer:
        if self._server is None:
            raise RuntimeError("FakeProviderThread is not running; call start() first")
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def root_url(self) -> str:
        return self.server.root_url

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="fake-provider", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._startup_timeout):
            raise TimeoutError("fake provider thread did not start")
        if self._error is not None:
            raise RuntimeError("fake provider failed to start") from self._error
        self._wait_until_answering()
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                start_fake_provider(
                    self.host, self._requested_port, state=self.state, ssl_context=self._ssl_context
                )
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._server.close())
            # Anything still pending (a handler mid-delay) must be cancelled and awaited,
            # otherwise closing the loop warns about destroyed pending tasks.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("fake provider thread did not stop")
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument(
        "--keep-requests", type=int, default=1000, help="recorded requests kept (the newest)"
    )
    args = parser.parse_args(argv)

    async def serve() -> None:
        state = FakeProviderState(
            latency=args.latency, api_key=args.api_key, keep_requests=args.keep_requests
        )
        server = await start_fake_provider(args.host, args.port, state=state)
        # The parent process reads this line (or polls the port) to know we are up.
        print(f"fake provider listening on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
