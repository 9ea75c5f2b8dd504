"""Bad input: whatever a client sends, the gateway answers a 4xx with a clear message in
OpenAI's error shape (never a 500), records what it accepted, and keeps serving.

Hand-picked cases over HTTP, then property-based runs (hypothesis) on the request parser,
on attribution headers, and on random JSON bodies sent to `/v1/chat/completions`.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from servers import GatewayThread, read_rows, wait_until

from config.loader import parse_settings
from gateway.compose import writer_for
from gateway.errors import InvalidRequest
from gateway.proxy.attribution import Attribution, read_attribution
from gateway.proxy.payload import MAX_JSON_DEPTH, parse_payload

from .support import CHAT_PATH, DONE_LINE, chat_body, openai_error, span_record

MAX_BODY_BYTES = 64 * 1024
ID = re.compile(r"^[A-Za-z0-9._:@+=~-]{1,256}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
MOCK_OK = chat_body("mock")


@pytest.fixture(scope="module")
def shared_gateway(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    """One gateway for the whole module (a small body limit, so 413 is cheap to reach)."""
    settings_ = parse_settings(
        {
            "models": [
                {
                    "name": "gpt-test",
                    "deployments": [
                        {"provider": "openai", "model": "m", "api_base": fake_provider_server.url}
                    ],
                },
                {"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]},
                {
                    "name": "lite",
                    "deployments": [
                        {
                            "provider": "hosted_vllm",
                            "model": "m",
                            "api_base": fake_provider_server.url,
                        }
                    ],
                },
            ],
            "server": {"max_body_bytes": MAX_BODY_BYTES},
            # Cases that fail must not trip the breaker for the cases after them; whether bad
            # input can open a breaker is a test of its own.
            "circuit_breaker": {"fail_max": 100_000},
        },
        env={},
    )
    db = tmp_path_factory.mktemp("bad-input") / "spangate.db"
    gateway = GatewayThread(settings_, db).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(shared_gateway: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_gateway.base, timeout=10) as client:
        yield client


def assert_serving(client: httpx.Client) -> None:
    """A normal call still works."""
    response = client.post(CHAT_PATH, json=MOCK_OK)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def assert_openai_4xx(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = openai_error(response.content)
    assert error is not None, f"not OpenAI's error shape: {response.text[:300]}"
    assert len(error["message"]) >= 10, "the message does not say what is wrong"
    return error


@dataclass
class Case:
    """One bad request and the answer it must get."""

    name: str
    method: str = "POST"
    path: str = CHAT_PATH
    content: bytes | None = None
    json_body: Any = None
    headers: dict[str, Any] = field(default_factory=dict)
    status: int = 400
    param: str | None = None

    def send(self, client: httpx.Client) -> httpx.Response:
        if self.json_body is not None:
            return client.request(self.method, self.path, json=self.json_body, headers=self.headers)
        return client.request(self.method, self.path, content=self.content, headers=self.headers)


def _with(**fields: Any) -> dict[str, Any]:
    return {**MOCK_OK, **fields}


CASES = [
    Case("malformed JSON", content=b'{"model": "mock", "messages": ['),
    Case("trailing garbage", content=orjson.dumps(MOCK_OK) + b"}}"),
    Case("empty body", content=b""),
    Case("whitespace body", content=b" \n\t "),
    Case("JSON array body", json_body=[MOCK_OK]),
    Case("JSON string body", json_body="mock"),
    Case("JSON null body", content=b"null"),
    Case("deeply nested JSON", content=b"[" * 20_000 + b"]" * 20_000),
    Case("model is a number", json_body=_with(model=5), param="model"),
    Case("model is empty", json_body=_with(model=""), param="model"),
    Case("model missing", json_body={"messages": MOCK_OK["messages"]}, param="model"),
    Case("stream is a string", json_body=_with(stream="yes"), param="stream"),
    Case("stream_options is a list", json_body=_with(stream_options=[1]), param="stream_options"),
    Case("messages is a string", json_body=_with(messages="x"), param="messages"),
    Case("messages is a number", json_body=_with(messages=5), param="messages"),
    Case("messages holds a number", json_body=_with(messages=[5]), param="messages"),
    Case("tools is a number", json_body=_with(tools=5), param="tools"),
    Case("tools holds a number", json_body=_with(tools=[5]), param="tools"),
    Case("unknown model", json_body=_with(model="no-such-model"), status=404, param=None),
    Case("invalid UTF-8 in the body", content=b'{"model":"mock","messages":"\xff\xfe"}'),
    Case("lone surrogate escape", content=b'{"model":"mock\\ud800","messages":[]}'),
    Case("body over the limit", json_body=_with(pad="x" * (MAX_BODY_BYTES * 2)), status=413),
    Case("rollout id with spaces", json_body=MOCK_OK, headers={"X-Rollout-Id": "a b"}),
    Case("rollout id of 1000 chars", json_body=MOCK_OK, headers={"X-Rollout-Id": "r" * 1000}),
    Case("rollout id not UTF-8", json_body=MOCK_OK, headers={"X-Rollout-Id": b"r\xff"}),
    Case("rollout path with a space", path="/rollout/a%20b/v1/chat/completions", json_body=MOCK_OK),
    Case("attempt without rollout", json_body=MOCK_OK, headers={"X-Attempt-Id": "1"}),
    Case("agent id with slashes", json_body=MOCK_OK, headers={"X-Agent-Id": "a/b"}),
    Case("unknown route", path="/v1/nothing-here", status=404),
    Case("unknown API version", path="/v2/chat/completions", json_body=MOCK_OK, status=404),
    Case("GET on chat completions", method="GET", status=405),
    Case("DELETE on models", method="DELETE", path="/v1/models", status=405),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_an_openai_4xx_and_the_gateway_keeps_serving(
    case: Case, client: httpx.Client
) -> None:
    error = assert_openai_4xx(case.send(client), case.status)
    if case.param is not None:
        assert str(error.get("param") or "").startswith(case.param), error
    assert_serving(client)


TOOL_SCHEMAS = {
    "parameters is a number": 5,
    "properties is a number": {"type": "object", "properties": 5},
    "a property is a number": {"type": "object", "properties": {"a": 5}},
    "required is a number": {"type": "object", "required": 5},
    "items is a number": {"type": "object", "properties": {"a": {"type": "array", "items": 5}}},
    "enum is a number": {"type": "object", "properties": {"a": {"enum": 5}}},
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("schema", list(TOOL_SCHEMAS))
def test_tool_schemas_of_the_wrong_type_never_get_a_5xx(
    schema: str, stream: bool, client: httpx.Client
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": TOOL_SCHEMAS[schema]}}]
    body = {**MOCK_OK, "tools": tools, "stream": stream}
    with client.stream("POST", CHAT_PATH, json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code < 500, lines[:2]
    if response.status_code >= 400:
        assert openai_error("\n".join(lines).encode()), lines[:2]
    elif stream:
        assert lines[-1] == DONE_LINE
    assert_serving(client)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Huge": "a" * 100_000},
        {"X-Rollout-Id": "r" * 100_000},
        {f"X-Many-{i}": "v" for i in range(200)},
    ],
    ids=["100 KB header value", "100 KB rollout id", "200 headers"],
)
def test_absurd_headers_get_a_4xx_and_the_gateway_keeps_serving(
    headers: dict[str, str], client: httpx.Client
) -> None:
    # aiohttp's HTTP parser rejects these before any route runs (plain-text 400 or 431).
    response = client.post(CHAT_PATH, json=MOCK_OK, headers=headers)
    assert 400 <= response.status_code < 500 or response.status_code == 200, response.text
    assert_serving(client)


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-zz-garbage-01" + "0" * 500,
        "ff-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "00-" + "0" * 32 + "-" + "2" * 16 + "-01",
        "\u00e9t\u00e9".encode(),
    ],
    ids=["garbage", "version ff", "zero trace id", "not ASCII"],
)
def test_invalid_traceparent_is_ignored_and_a_new_trace_is_started(
    traceparent: str | bytes, client: httpx.Client, shared_gateway: GatewayThread
) -> None:
    response = client.post(CHAT_PATH, json=MOCK_OK, headers={"traceparent": traceparent})
    assert response.status_code == 200, response.text
    assert HEX32.match(response.headers["X-Trace-Id"])
    assert response.headers["X-Trace-Id"] not in ("0" * 32, "1" * 32)
    [span] = shared_gateway.spans(span_id=response.headers["X-Span-Id"])
    assert span["parent_span_id"] is None


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Meta-Note": b"caf\xe9 \xff\xfe"},
        {"X-Tags": b"ok,\xff\xfe"},
        {"X-Meta-Note": "zero\u200bwidth \u00e9".encode(), "X-Tags": "a," * 500},
    ],
    ids=["metadata not UTF-8", "tags not UTF-8", "odd but valid UTF-8"],
)
def test_odd_attribution_headers_never_stop_recording(
    headers: dict[str, Any], gateway: GatewayThread
) -> None:
    """Rejected (4xx) or recorded, but never a poison span that stops the store writer.

    Uses a gateway of its own: a dead writer must not take the other tests down with it.
    """
    with httpx.Client(base_url=gateway.base, timeout=10) as client:
        response = client.post(CHAT_PATH, json=MOCK_OK, headers=headers)
        if response.status_code != 200:
            assert_openai_4xx(response)
        after = client.post(CHAT_PATH, json=MOCK_OK)
    assert after.status_code == 200
    ids = [r.headers["X-Span-Id"] for r in (response, after) if r.status_code == 200]
    gateway.flush(timeout=2)  # fails if the writer stopped taking spans
    for span_id in ids:
        assert gateway.spans(span_id=span_id), f"span {span_id} was never written"


def test_bad_input_does_not_open_the_circuit_breaker(gateway: GatewayThread) -> None:
    """Client mistakes say nothing about the deployment's health: after a burst of them
    (more than `circuit_breaker.fail_max`) the model group still serves everyone."""
    odd_tool = {"type": "function", "function": {"name": "f", "parameters": 5}}
    bad_bodies = [_with(messages=5), _with(tools=[5]), _with(tools=[odd_tool])] * 6
    with httpx.Client(base_url=gateway.base, timeout=10) as client:
        statuses = [client.post(CHAT_PATH, json=body).status_code for body in bad_bodies]
        response = client.post(CHAT_PATH, json=MOCK_OK)
    assert response.status_code == 200, f"{response.text} after client errors {statuses}"
    assert all(400 <= status < 500 for status in statuses), statuses


def test_a_span_the_store_cannot_encode_does_not_stop_the_writer(tmp_path: Path) -> None:
    """Text that is not valid UTF-8 (surrogate escapes from header bytes) in one span must not
    cost the spans after it: the writer keeps writing, and the bad span is stored or journaled."""
    db = tmp_path / "writer.db"
    writer = writer_for(db, flush_interval=0.05)
    writer.start()
    poison = span_record("poison", 1, tags=["ok", "bad \udcff"], metadata={"note": "\udcfe"})
    good = [span_record("poison", seq) for seq in (2, 3)]
    try:
        writer.put(poison)
        writer.put(good[0])
        wait_until(
            lambda: read_rows(db, "select 1 from spans where span_id = ?", good[0]["span_id"]),
            timeout=3,
            what="the span after the bad one to be written",
        )
        writer.put(good[1])
    finally:
        writer.close(timeout=10)
    stored = {row["span_id"] for row in read_rows(db, "select span_id from spans")}
    assert {g["span_id"] for g in good} <= stored
    assert poison["span_id"] in stored or writer.spilled >= 1, "the bad span vanished"


# -- property-based -------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
MODELS = st.sampled_from(["mock", "gpt-test", "", "no-such-model"]) | JSON_VALUES
REQUEST_OBJECTS = st.fixed_dictionaries(
    {"model": MODELS},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "tool"]) | JSON_VALUES},
                optional={"content": JSON_VALUES},
            ),
            max_size=3,
        )
        | JSON_VALUES,
        "stream": st.booleans() | JSON_VALUES,
        "stream_options": st.fixed_dictionaries({"include_usage": JSON_VALUES}) | JSON_VALUES,
        "tools": JSON_VALUES,
        "max_tokens": JSON_VALUES,
        "temperature": JSON_VALUES,
    },
)


OPERATIONS = st.sampled_from([None, "chat", "text_completion", "embeddings", "responses"])


def _check_parsed(raw: bytes, operation: str | None = None) -> dict[str, Any] | None:
    """`parse_payload` either returns a request the gateway can work with or raises
    InvalidRequest (a 400); nothing else."""
    try:
        payload = parse_payload(raw, operation)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message
        return None
    assert isinstance(payload, dict)
    assert isinstance(payload["model"], str) and payload["model"]
    assert payload.get("stream") in (True, False, None)
    assert isinstance(payload.get("stream_options"), dict | None)
    if operation == "chat":
        messages = payload["messages"]
        assert isinstance(messages, list) and messages
        assert all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        assert isinstance(payload.get("tools"), list | None)
    return payload


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(raw=st.binary(max_size=200), operation=OPERATIONS)
def test_parse_payload_on_arbitrary_bytes_returns_a_request_or_invalid_request(
    raw: bytes, operation: str | None
) -> None:
    _check_parsed(raw, operation)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(value=REQUEST_OBJECTS | JSON_VALUES, operation=OPERATIONS)
def test_parse_payload_on_arbitrary_json_returns_a_request_or_invalid_request(
    value: Any, operation: str | None
) -> None:
    raw = json.dumps(value).encode()
    payload = _check_parsed(raw, operation)
    if payload is not None:
        assert payload == json.loads(raw), "the parser changed the request"


ID_CHARS = "abcXYZ0123456789._:@+=~-"
HEX = "0123456789abcdef"
ID_TEXT = st.text(alphabet=ID_CHARS, min_size=1, max_size=12) | st.just("r" * 257)
HEADER_TEXT = (
    ID_TEXT
    | st.text(max_size=30)
    # aiohttp hands header bytes that are not UTF-8 over as surrogate escapes.
    | st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
)
HEADER_NAMES = st.sampled_from(
    ["x-rollout-id", "x-attempt-id", "x-agent-id", "x-tags", "traceparent", "x-meta-note"]
) | st.text(alphabet="abz09-", min_size=1, max_size=8).map(lambda name: f"x-meta-{name}")
TRACEPARENTS = st.builds(
    "-".join,
    st.tuples(*(st.text(alphabet=HEX, min_size=n, max_size=n) for n in (2, 32, 16, 2))),
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    match_info=st.fixed_dictionaries(
        {}, optional={"rollout_id": HEADER_TEXT, "attempt_id": ID_TEXT}
    ),
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_TEXT | TRACEPARENTS), max_size=8),
)
def test_read_attribution_returns_storable_attribution_or_invalid_request(
    match_info: dict[str, str], headers: list[tuple[str, str]]
) -> None:
    try:
        attribution = read_attribution(match_info, CIMultiDict(headers))
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(attribution, Attribution)
    for value in (attribution.rollout_id, attribution.attempt_id, attribution.agent_id):
        assert value is None or ID.match(value)
    if attribution.attempt_id is not None:
        assert attribution.rollout_id is not None
    assert attribution.trace_id is None or HEX32.match(attribution.trace_id)
    assert len(attribution.tags) <= 64 and len(attribution.metadata) <= 64
    # Everything attribution yields ends up in a span, which is stored as JSON.
    orjson.dumps({"tags": attribution.tags, "metadata": attribution.metadata})


SCHEMAS = st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "array"]) | JSON_VALUES},
    optional={
        "properties": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3) | JSON_VALUES,
        "required": st.lists(st.text(max_size=5), max_size=3) | JSON_VALUES,
        "items": JSON_VALUES,
        "enum": JSON_VALUES,
    },
)
TOOLS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function") | JSON_VALUES,
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=8) | JSON_VALUES},
                optional={"parameters": SCHEMAS | JSON_VALUES},
            )
            | JSON_VALUES,
        }
    )
    | JSON_VALUES,
    min_size=1,
    max_size=2,
)
HTTP_BODIES = (
    st.fixed_dictionaries(
        {"model": st.just("mock")},
        optional={
            "messages": st.just(MOCK_OK["messages"]) | JSON_VALUES,
            "stream": st.booleans(),
            "tools": TOOLS | JSON_VALUES,
            "tool_choice": st.just("none") | JSON_VALUES,
            "max_tokens": JSON_VALUES,
        },
    )
    | REQUEST_OBJECTS
    | JSON_VALUES
)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(body=HTTP_BODIES)
def test_random_json_bodies_never_get_a_5xx(body: Any, client: httpx.Client) -> None:
    # Only `mock` (built in) or unknown models can be named with a string that routes, so no
    # upstream is involved and a 502/504 is as wrong as a 500.
    if isinstance(body, dict) and body.get("model") == "gpt-test":
        body = {**body, "model": "mock"}
    with client.stream("POST", CHAT_PATH, json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code < 500, (body, lines[:3])
    if response.status_code >= 400:
        assert openai_error("\n".join(lines).encode()), (body, lines[:3])
    elif isinstance(body, dict) and body.get("stream") is True:
        assert lines[-1] == DONE_LINE


# -- deep JSON, cursors, event ids, encodings, HEAD ---------------------------------------------


def nested(depth: int) -> bytes:
    """A JSON value whose arrays nest `depth` levels deep."""
    return b"[" * depth + b"1" + b"]" * depth


def chat(model: str, deep: bytes, **extra: Any) -> bytes:
    fields = b"".join(b',"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in extra.items())
    return b'{"model":"%s","messages":[{"role":"user","content":"hi","x":%s}]%s}' % (
        model.encode(),
        deep,
        fields,
    )


def tool_chat(model: str, deep: bytes) -> bytes:
    tools = b'[{"type":"function","function":{"name":"f","parameters":{"type":"object","x":%s}}}]'
    return b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"tools":%s}' % (
        model.encode(),
        tools % deep,
    )


DEEP_REQUESTS: dict[str, tuple[str, str, Any]] = {
    "chat": ("POST", CHAT_PATH, lambda d: chat("mock", d)),
    "chat stream": ("POST", CHAT_PATH, lambda d: chat("mock", d, stream=True)),
    "renamed model": ("POST", CHAT_PATH, lambda d: chat("gpt-test", d)),
    "renamed model stream": ("POST", CHAT_PATH, lambda d: chat("gpt-test", d, stream=True)),
    "tools": ("POST", CHAT_PATH, lambda d: tool_chat("mock", d)),
    "litellm": ("POST", CHAT_PATH, lambda d: chat("lite", d)),
    "litellm stream": ("POST", CHAT_PATH, lambda d: chat("lite", d, stream=True)),
    "rollout prefix": ("POST", "/rollout/deep/v1/chat/completions", lambda d: chat("mock", d)),
    "completions": ("POST", "/v1/completions", lambda d: b'{"model":"mock","prompt":%s}' % d),
    "embeddings": ("POST", "/v1/embeddings", lambda d: b'{"model":"mock","input":%s}' % d),
    "responses": ("POST", "/v1/responses", lambda d: b'{"model":"mock","input":%s}' % d),
    "create rollout": ("POST", "/api/rollouts", lambda d: b'{"metadata":{"a":%s}}' % d),
    "patch rollout": ("PATCH", "/api/rollouts/deep", lambda d: b'{"metadata":{"a":%s}}' % d),
    "create attempt": ("POST", "/api/rollouts/deep/attempts", lambda d: b'{"x":%s}' % d),
    "reward": ("POST", "/api/rewards", lambda d: b'{"rollout_id":"deep","value":1,"details":%s}' % d),
    "rollout reward": ("POST", "/api/rollouts/deep/rewards", lambda d: b'{"value":1,"details":%s}' % d),
}  # fmt: skip


@pytest.mark.parametrize("depth", [255, 300, 1023, 1024])
@pytest.mark.parametrize("request_name", list(DEEP_REQUESTS))
def test_json_nested_hundreds_of_levels_is_a_400_on_every_route(
    request_name: str, depth: int, client: httpx.Client
) -> None:
    method, path, build = DEEP_REQUESTS[request_name]
    assert_openai_4xx(client.request(method, path, content=build(nested(depth))), 400)
    assert_serving(client)


@pytest.mark.parametrize("request_name", ["renamed model stream", "tools", "litellm"])
def test_json_nested_within_the_limit_is_served_and_recorded(
    request_name: str, client: httpx.Client, shared_gateway: GatewayThread
) -> None:
    """The limit leaves room for what the gateway wraps around a body (the record, litellm)."""
    method, path, build = DEEP_REQUESTS[request_name]
    response = client.request(method, path, content=build(nested(MAX_JSON_DEPTH - 10)))
    assert response.status_code == 200, response.text[:300]
    [span] = shared_gateway.spans(span_id=response.headers["X-Span-Id"])
    assert span["status"] == "ok"


# Not a cursor at all, and cursors that decode to JSON of some other shape or size.
BAD_CURSORS = ["abc", "!!!!", "A" * 5000, "%00", "\u00e9t\u00e9"]
ODD_CURSORS = [
    "eyJ4Ijo1fQ==",
    "WzEsMl0=",
    "OTk5OTk5OTk5OTk5OTk5OTk5OTk5",
    "W1tbW1tbW1tbXV1dXV1dXV1dXQ==",
]


@pytest.mark.parametrize("cursor", BAD_CURSORS, ids=range(len(BAD_CURSORS)))
@pytest.mark.parametrize("path", ["/api/rollouts", "/api/spans", "/api/rewards"])
def test_a_malformed_cursor_is_a_4xx(path: str, cursor: str, client: httpx.Client) -> None:
    assert_openai_4xx(client.get(path, params={"cursor": cursor}))


@pytest.mark.parametrize("cursor", ODD_CURSORS, ids=range(len(ODD_CURSORS)))
@pytest.mark.parametrize("path", ["/api/rollouts", "/api/spans", "/api/rewards"])
def test_a_cursor_of_another_shape_is_a_4xx_or_an_empty_page(
    path: str, cursor: str, client: httpx.Client
) -> None:
    response = client.get(path, params={"cursor": cursor})
    if response.status_code == 200:
        assert response.json() == {"data": [], "next_cursor": None}
    else:
        assert_openai_4xx(response)


BAD_EVENT_IDS = ["9" * 100, "-1", "1e5", "abc", "0x10", str(2**63), "1 2"]


@pytest.mark.parametrize("value", BAD_EVENT_IDS)
@pytest.mark.parametrize("where", ["Last-Event-ID", "after"])
def test_an_odd_event_id_on_the_span_stream_is_a_422(
    where: str, value: str, client: httpx.Client
) -> None:
    if where == "after":
        response = client.get("/api/spans/stream", params={"after": value})
    else:
        response = client.get("/api/spans/stream", headers={"Last-Event-ID": value})
    error = assert_openai_4xx(response, 422)
    assert error["param"] == where


def test_the_largest_event_id_resumes_the_stream(client: httpx.Client) -> None:
    headers = {"Last-Event-ID": str(2**63 - 1)}
    with client.stream("GET", "/api/spans/stream", headers=headers) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()) == ": connected"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
@pytest.mark.parametrize("path", [CHAT_PATH, "/api/rollouts"])
def test_a_body_not_encoded_as_it_claims_is_a_400_and_the_next_request_is_served(
    path: str, encoding: str, client: httpx.Client
) -> None:
    body = orjson.dumps(MOCK_OK if path == CHAT_PATH else {"agent": "a", "tags": ["t"]})
    response = client.post(path, content=body, headers={"Content-Encoding": encoding})
    assert response.status_code == 400, response.text
    if response.headers.get("Content-Type", "").startswith("application/json"):
        assert openai_error(response.content), response.text
    # Otherwise aiohttp's parser refused it before any route ran (`br` without Brotli
    # installed, a deflate stream that fails only at its end): a plain-text 400.
    assert_serving(client)


def test_head_answers_like_get_without_a_body_on_every_get_route(
    shared_gateway: GatewayThread, client: httpx.Client
) -> None:
    assert shared_gateway.app is not None
    paths = sorted(
        {
            re.sub(r"{[^}]+}", "nope", route.resource.canonical)
            for route in shared_gateway.app.router.routes()
            if route.method == "GET" and route.resource is not None
        }
    )
    assert "/api/rollouts" in paths and "/api/spans/stream" in paths
    for path in paths:
        head = client.head(path)
        assert head.status_code not in (405, 500), (path, head.status_code)
        assert head.content == b"", path
        if path != "/api/spans/stream":
            assert head.status_code == client.get(path).status_code, path


@pytest.mark.parametrize(
    "head",
    [
        b"X-Bad\x01Name: v\r\n",
        b"No colon here\r\n",
        b"Content-Length: abc\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"X-Huge: " + b"a" * 70_000 + b"\r\n",
    ],
    ids=["control char in a name", "no colon", "bad length", "two lengths", "70 KB header"],
)
def test_invalid_headers_get_a_4xx_and_the_gateway_keeps_serving(
    head: bytes, shared_gateway: GatewayThread, client: httpx.Client
) -> None:
    with socket.create_connection(("127.0.0.1", shared_gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n{}")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", status_line), status_line
    assert_serving(client)


def test_the_gateway_still_serves_after_all_that(client: httpx.Client) -> None:
    assert_serving(client)
