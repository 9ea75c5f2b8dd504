"""Odd upstream answers the gateway already handled soundly when a review swept them (usage,
answers, streams, error bodies, rate-limit headers, statuses, encodings): each is passed on
and recorded, and the gateway stays ready with finite metrics."""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from prometheus_client.parser import text_string_to_metric_families
from raw_upstream import RawUpstream, response, stream_head
from servers import GatewayThread, wait_until

CHAT = "/v1/chat/completions"
SSE = {"Content-Type": "text/event-stream"}


def chat_body(stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return body


def answer(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    return {**base, **fields}


def chunk(delta: Any, finish: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def the_span(gateway: GatewayThread, response: httpx.Response) -> dict[str, Any]:
    span_id = response.headers.get("X-Span-Id")
    assert span_id, "no X-Span-Id"
    found: list[dict[str, Any]] = []
    wait_until(lambda: found.extend(gateway.spans(span_id=span_id)) or found, timeout=10)
    return found[0]


def metrics_are_finite(gateway: GatewayThread) -> None:
    text = httpx.get(f"{gateway.base}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert math.isfinite(sample.value), sample


@pytest.fixture(scope="module")
def gw(
    fake_provider_server: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayThread]:
    settings = gateway_settings(fake_provider_server.url, retries={"attempts": 1})
    gateway = GatewayThread(settings, tmp_path_factory.mktemp("sweep") / "s.db").start()
    yield gateway
    assert httpx.get(f"{gateway.base}/health/ready").status_code == 200
    metrics_are_finite(gateway)
    gateway.stop()


USAGES = {
    "strings": {"prompt_tokens": "3", "completion_tokens": "2"},
    "floats": {"prompt_tokens": 3.5, "completion_tokens": 1e308},
    "huge-float": {"prompt_tokens": 7770000007, "completion_tokens": 1},
    "null": None,
    "nested": {"prompt_tokens": {"a": 1}, "completion_tokens": [1]},
    "missing": "MISSING",
    "details-odd": {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": -5},
        "completion_tokens_details": "x",
    },
}


@pytest.mark.parametrize("name", list(USAGES))
def test_odd_usage_in_a_plain_answer(
    name: str, gw: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    body = answer(usage=USAGES[name])
    if USAGES[name] == "MISSING":
        del body["usage"]
    raw = _big(orjson.dumps(body))
    fake_provider.state.add_fault(status=200, body=raw.decode())
    r = httpx.post(gw.base + CHAT, json=chat_body())
    assert r.status_code == 200 and r.content == raw
    span = the_span(gw, r)
    assert (span["status"], span["http_status"]) == ("ok", 200)


@pytest.mark.parametrize("name", list(USAGES))
def test_odd_usage_in_a_stream(
    name: str, gw: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    usage = USAGES[name]
    chunks = [chunk({"content": "hi"}), chunk({}, "stop")]
    if usage != "MISSING":
        chunks.append({"id": "chatcmpl-1", "choices": [], "usage": usage})
    events = "".join(f"data: {_big(orjson.dumps(c)).decode()}\n\n" for c in chunks)
    events += "data: [DONE]\n\n"
    fake_provider.state.add_fault(status=200, body=events, headers=SSE)
    with httpx.stream("POST", gw.base + CHAT, json=chat_body(True)) as r:
        got = b"".join(r.iter_bytes())
    assert r.status_code == 200 and got.endswith(b"data: [DONE]\n\n")
    span = the_span(gw, r)
    assert span["status"] == "ok"


def _big(raw: bytes) -> bytes:
    """2**70 in the JSON text (orjson cannot write it; it reads it as a float)."""
    return raw.replace(b"7770000007", str(2**70).encode())


ODD_ANSWERS = {
    "model-1MB": answer(model="m" * (1024 * 1024)),
    "model-object": answer(model={"a": 1}),
    "id-number": answer(id=5),
    "id-object": answer(id={"a": 1}),
    "content-object": answer(choices=[{"index": 0, "message": {"content": {"a": 1}}}]),
    "args-object": answer(
        choices=[
            {
                "index": 0,
                "message": {
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": 5, "arguments": {}}}
                    ]
                },
                "finish_reason": {"x": 1},
            }
        ]
    ),
    "finish-list": answer(choices=[{"index": "x", "message": {}, "finish_reason": [1]}]),
    "top-level-list": [1, 2],
    "choices-object": answer(choices={"0": {}}),
}


@pytest.mark.parametrize("name", list(ODD_ANSWERS))
def test_odd_plain_answers(name: str, gw: GatewayThread, fake_provider: FakeProviderThread) -> None:
    raw = orjson.dumps(ODD_ANSWERS[name])
    fake_provider.state.add_fault(status=200, body=raw.decode())
    r = httpx.post(gw.base + "/rollout/sweep/attempt/a" + CHAT, json=chat_body())
    if r.status_code == 200:
        assert r.content == raw
    else:
        assert r.status_code == 502 and r.json()["error"]["type"]
    span = the_span(gw, r)
    assert span["http_status"] == r.status_code


ODD_STREAMS = {
    "crlf": b"".join(
        b"data: " + orjson.dumps(c) + b"\r\n\r\n"
        for c in (chunk({"content": "a"}), chunk({}, "stop"))
    )
    + b"data: [DONE]\r\n\r\n",
    "no-space-and-comments": b": ping\n\ndata:" + orjson.dumps(chunk({"content": "a"})) + b"\n\n"
    b": keepalive\n\ndata:[DONE]\n\n",
    "done-in-the-middle": b"data: "
    + orjson.dumps(chunk({"content": "a"}))
    + b"\n\ndata: [DONE]\n\n"
    b"data: " + orjson.dumps(chunk({"content": "b"})) + b"\n\n",
    "finish-object": b"data: " + orjson.dumps(chunk({"content": "a"}, {"x": [1]})) + b"\n\n"
    b"data: [DONE]\n\n",
    "tool-index-odd": b"".join(
        b"data: "
        + orjson.dumps(
            chunk(
                {"tool_calls": [{"index": i, "id": "c", "function": {"name": "f", "arguments": a}}]}
            )
        )
        + b"\n\n"
        for i, a in (("0", "{"), (2**63, "}"), (-1, 5), (None, None))
    )
    + b"data: [DONE]\n\n",
    "usage-absurd": b"data: "
    + orjson.dumps(
        {"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": 18446744073709551615}}
    )
    + b"\n\n"
    b"data: [DONE]\n\n",
    "no-final-blank-line": b"data: " + orjson.dumps(chunk({"content": "a"})) + b"\n\ndata: [DONE]",
    "not-json": b"data: {nope\n\ndata: 1e309\n\ndata: [DONE]\n\n",
}


@pytest.mark.parametrize("name", list(ODD_STREAMS))
def test_odd_streams(name: str, gw: GatewayThread, fake_provider: FakeProviderThread) -> None:
    raw = ODD_STREAMS[name]
    fake_provider.state.add_fault(status=200, body=raw.decode(), headers=SSE)
    with httpx.stream(
        "POST", gw.base + "/rollout/sweep-s/attempt/a" + CHAT, json=chat_body(True)
    ) as r:
        got = b"".join(r.iter_bytes())
    assert r.status_code == 200
    if name == "done-in-the-middle":
        # The answer ends at [DONE], as it would for an SDK reading the upstream directly.
        assert got == raw.split(b"data: [DONE]\n\n")[0] + b"data: [DONE]\n\n"
    elif name == "usage-absurd":
        # The gateway asked for usage the client did not: its usage chunk is not passed on.
        assert got == b"data: [DONE]\n\n"
    elif name == "no-final-blank-line":
        assert got == raw + b"\n\n" or got == raw, got
    else:
        assert got == raw, got
    span = the_span(gw, r)
    assert span["status"] in ("ok", "error")
    print(name, span["status"], span["error_type"], span["finish_reasons"], span["tool_calls"])


ERRORS = {
    "html": ("<html>bad</html>", {"Content-Type": "text/html"}),
    "json-list": ("[1,2]", {}),
    "json-string": ('"oops"', {}),
    "error-string": ('{"error": "oops"}', {}),
    "error-nested-odd": ('{"error": {"message": {"a": 1}, "type": [1]}}', {}),
    "empty": ("", {}),
}


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("name", list(ERRORS))
def test_odd_error_bodies(
    name: str, status: int, gw: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    body, headers = ERRORS[name]
    fake_provider.state.add_fault(status=status, body=body, headers=headers)
    r = httpx.post(gw.base + CHAT, json=chat_body())
    assert r.status_code == status
    assert r.content == body.encode()
    span = the_span(gw, r)
    assert (span["status"], span["http_status"]) == ("error", status)


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "-1"},
        {"retry-after": "1e309"},
        {"retry-after": "99999999999999999999999"},
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"retry-after": "Mon, 01 Jan 1900 00:00:00 GMT"},
        {"retry-after-ms": "-5"},
        {"x-ratelimit-remaining-tokens": "-1e309", "x-ratelimit-limit-requests": "nan"},
    ],
)
def test_odd_rate_limit_headers(
    headers: dict[str, str],
    make_gateway: Callable[..., GatewayThread],
    fake_provider: FakeProviderThread,
) -> None:
    gateway = make_gateway(retries={"attempts": 2, "backoff": {"initial": 0.01, "max": 0.02}})
    fake_provider.state.add_fault(status=429, headers=headers, times=2)
    r = httpx.post(gateway.base + CHAT, json=chat_body(), timeout=10)
    assert r.status_code == 429
    span = the_span(gateway, r)
    assert (span["status"], span["http_status"]) == ("error", 429)


# -- raw upstream: statuses and encodings aiohttp would not send ------------------------------


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def raw_gw(make_gateway: Callable[..., GatewayThread], raw: RawUpstream) -> GatewayThread:
    return make_gateway(settings=gateway_settings(raw.url, retries={"attempts": 1}))


@pytest.mark.parametrize("status", [299, 600, 999])
def test_odd_statuses(status: int, raw: RawUpstream, raw_gw: GatewayThread) -> None:
    raw.add(response(status, b'{"x": 1}'))
    r = httpx.post(raw_gw.base + CHAT, json=chat_body())
    span = the_span(raw_gw, r)
    print(status, r.status_code, r.content[:100], span["status"], span["http_status"])
    assert r.status_code in (status, 502)


def test_interim_status_then_close(raw: RawUpstream, raw_gw: GatewayThread) -> None:
    raw.add(b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nhello")
    r = httpx.post(raw_gw.base + CHAT, json=chat_body(), timeout=30)
    span = the_span(raw_gw, r)
    assert r.status_code == 502 and span["http_status"] == 502


@pytest.mark.parametrize("stream", [False, True])
def test_gzip_declared_but_not_gzipped(
    stream: bool, raw: RawUpstream, raw_gw: GatewayThread
) -> None:
    if stream:
        raw.add(
            stream_head(extra="Content-Encoding: gzip\r\n"), b"data: {}\n\n", b"data: [DONE]\n\n"
        )
        with httpx.stream("POST", raw_gw.base + CHAT, json=chat_body(True)) as r:
            got = b"".join(r.iter_bytes())
    else:
        raw.add(response(200, orjson.dumps(answer()), extra="Content-Encoding: gzip\r\n"))
        r = httpx.post(raw_gw.base + CHAT, json=chat_body())
        got = r.content
    span = the_span(raw_gw, r)
    assert r.status_code == 502, got
    assert span["status"] == "error" and span["http_status"] == 502


def test_gzip_that_is_gzipped_is_decoded(raw: RawUpstream, raw_gw: GatewayThread) -> None:
    body = orjson.dumps(answer())
    raw.add(response(200, gzip.compress(body), extra="Content-Encoding: gzip\r\n"))
    r = httpx.post(raw_gw.base + CHAT, json=chat_body())
    assert r.status_code == 200 and r.content == body


def test_sse_split_mid_character_and_mid_line(raw: RawUpstream, raw_gw: GatewayThread) -> None:
    text = "é😀中"
    event = b"data: " + orjson.dumps(chunk({"content": text})) + b"\r\n\r\n"
    cut = event.index("😀".encode()) + 2
    raw.add(stream_head(), event[:cut], event[cut:-3], event[-3:], b"data: [DONE]\r\n\r\n")
    with httpx.stream("POST", raw_gw.base + CHAT, json=chat_body(True)) as r:
        got = b"".join(r.iter_bytes())
    assert got == event + b"data: [DONE]\r\n\r\n"
    span = the_span(raw_gw, r)
    assert span["status"] == "ok"
    assert span["response_body"]["choices"][0]["message"]["content"] == text
