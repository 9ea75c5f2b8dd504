"""What a client sees on the wire from the OpenAI proxy routes, read byte for byte off raw
sockets, so the HTTP server in front of those routes can change without any client noticing."""

# Pinned elsewhere over real HTTP (so they guard any server in front of the routes too), and not
# repeated here:
# - a body over server.max_body_bytes sent with Content-Length is a 413 in the error shape:
#   test_errors_functional.py::test_body_over_max_body_bytes_answers_413_in_openai_shape
# - a body that stops arriving is a 408 `request_timeout` (raw socket):
#   test_bounds_functional.py::test_a_body_that_trickles_in_gets_a_408
# - auth: no key 401, a read key on the model 403, a proxy key 200, the gateway key never
#   forwarded: test_auth_functional.py::test_no_key_is_401_in_the_error_shape,
#   ::test_read_key_cannot_call_the_model, ::test_proxy_key_calls_the_model_but_not_the_api,
#   ::test_gateway_key_is_not_forwarded_to_a_deployment_without_a_key,
#   ::test_gateway_key_in_several_headers_reaches_neither_the_upstream_nor_the_store
# - a client that hangs up while the upstream still answers is a 499 `cancelled` span:
#   test_bounds_functional.py::test_a_client_that_leaves_during_the_upstream_wait_is_recorded_as_cancelled
#   and ::test_a_client_that_leaves_mid_stream_is_recorded_as_cancelled
# - an unknown route under /v1 (and under the rollout prefixes) is a 404 in the error shape:
#   test_errors_functional.py::test_unknown_route_answers_404_in_openai_shape

from __future__ import annotations

import gzip
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
import orjson
from fake_provider import FakeProviderThread
from servers import GatewayThread
from shapes import assert_openai_error

CHAT = "/v1/chat/completions"
READ_TIMEOUT = 10.0
MAX_BODY_BYTES = 2048
HEADER_TIMEOUT = 0.5
# A server that keeps a deadline closes within this long past it.
CLOSE_SLACK = 2.5


# -- the client side of the wire ---------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP response as it came: header names lower-cased, the body unframed."""

    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    chunk_sizes: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The header's value, None when absent; sent twice is a failure."""
        values = [value for key, value in self.headers if key == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


class Wire:
    """One client connection: exact bytes out, whole HTTP/1.1 answers in, one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_until_answered(self, pieces: Iterable[bytes]) -> None:
        """Send `pieces` one by one, stopping once the server answers (or hangs up) early."""
        for piece in pieces:
            if self.pending or select.select([self.sock], [], [], 0)[0]:
                return
            try:
                self.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                return

    def answer(self) -> Answer:
        """The next whole response: status line, headers, and the body framed by
        Content-Length, chunked encoding, or (neither) the end of the connection."""
        head = self._until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        fields = (line.partition(":") for line in lines)
        headers = [(name.strip().lower(), value.strip()) for name, _, value in fields]
        answer = Answer(version, int(status), headers)
        if answer.status < 200 or answer.status in (204, 304):
            return answer
        if (answer.header("transfer-encoding") or "").lower() == "chunked":
            answer.chunked = True
            answer.body = self._chunks(answer.chunk_sizes)
        elif (length := answer.header("content-length")) is not None:
            answer.body = self._exactly(int(length))
        else:
            answer.body = self._rest()
        return answer

    def assert_closed(self, within: float) -> float:
        """Wait for the server to close the connection, sending nothing more; returns when."""
        assert not self.pending, f"unread bytes: {self.pending[:200]!r}"
        started = time.monotonic()
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {within}s") from None
        except ConnectionResetError:
            data = b""  # closed too, only less politely
        assert data == b"", f"more bytes after the answer: {data[:200]!r}"
        return time.monotonic() - started

    def trickle(self, data: bytes, every: float) -> float:
        """Send `data` a byte every `every` seconds until the server hangs up; returns how long
        after the first byte it did. Fails if it answers, or never hangs up."""
        self.sock.settimeout(every)
        started = time.monotonic()
        for byte in data:
            try:
                got = self.sock.recv(65536)
            except TimeoutError:
                got = None  # still open: the next byte
            except ConnectionResetError:
                got = b""
            if got is not None:
                assert got == b"", f"the server answered instead of hanging up: {got[:200]!r}"
                return time.monotonic() - started
            try:
                self.sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
        raise AssertionError(f"still open after {time.monotonic() - started:.1f}s of trickling")

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection; left: {self.pending[:200]!r}")
        self.pending += chunk

    def _until(self, marker: bytes) -> bytes:
        while (at := self.pending.find(marker)) < 0:
            self._more()
        found, self.pending = self.pending[:at], self.pending[at + len(marker) :]
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self.pending) < size:
            self._more()
        found, self.pending = self.pending[:size], self.pending[size:]
        return found

    def _chunks(self, sizes: list[int]) -> bytes:
        body = b""
        while True:
            size = int(self._until(b"\r\n").split(b";")[0], 16)
            sizes.append(size)
            if size == 0:
                break
            body += self._exactly(size)
            assert self._exactly(2) == b"\r\n", "a chunk not followed by CRLF"
        while self._until(b"\r\n"):
            pass  # trailers, up to the empty line
        return body

    def _rest(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.pending += chunk
        rest, self.pending = self.pending, b""
        return rest


# -- requests ----------------------------------------------------------------------------------


def request(
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: Iterable[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
    framing: str = "length",
) -> bytes:
    """The exact bytes of a request: JSON `body` framed by Content-Length (`framing="length"`),
    or only announced as chunked (`framing="chunked"`, the pieces sent apart: `chunks`)."""
    lines = [f"{method} {path} {version}", "Host: spangate"]
    if body is not None:
        lines.append("Content-Type: application/json")
        if framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if framing == "chunked" else head + (body or b"")


def chunks(body: bytes, size: int) -> list[bytes]:
    """`body` in chunked encoding, one list item per chunk, the final empty chunk last."""
    pieces = [body[at : at + size] for at in range(0, len(body), size)]
    return [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces] + [b"0\r\n\r\n"]


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat_body(text: str, *, stream: bool = False) -> bytes:
    return orjson.dumps({"model": "gpt-test", "messages": messages(text), "stream": stream})


def chat(path: str, text: str, **options: Any) -> bytes:
    return request("POST", path, chat_body(text), **options)


def reply_text(answer: Answer) -> str:
    assert answer.status == 200, (answer.status, answer.body[:300])
    return answer.json()["choices"][0]["message"]["content"]


def assert_error(answer: Answer, status: int, *, code: str | None = None) -> dict[str, Any]:
    """The answer is `status` in OpenAI's error shape; returns the inner error."""
    response = httpx.Response(answer.status, headers=answer.headers, content=answer.body)
    return assert_openai_error(response, status, code=code)


def span_of(gateway: GatewayThread, answer: Answer) -> dict[str, Any]:
    """The span an answer's `X-Span-Id` names, once written."""
    span_id = answer.header("x-span-id")
    assert span_id, f"no X-Span-Id on a {answer.status}"
    [span] = gateway.spans(span_id=span_id)
    return span


# -- one connection, many requests -------------------------------------------------------------


def test_one_keep_alive_connection_serves_proxy_and_other_routes_in_turn(
    gateway: GatewayThread,
) -> None:
    calls = "/rollout/ka-1/attempt/a1/v1/chat/completions"
    with Wire(gateway.port) as wire:
        wire.send(chat(calls, "first"))
        first = wire.answer()
        wire.send(request("GET", "/health/live"))
        live = wire.answer()
        wire.send(request("GET", "/v1/models"))
        models = wire.answer()
        wire.send(chat(calls, "second"))
        second = wire.answer()
        reward = {"rollout_id": "ka-1", "span_id": first.header("x-span-id"), "value": 1.0}
        wire.send(request("POST", "/api/rewards", orjson.dumps(reward)))
        rewarded = wire.answer()

    assert reply_text(first) == "echo: first"
    assert (live.status, live.json()) == (200, {"status": "ok"})
    assert models.status == 200
    assert [model["id"] for model in models.json()["data"]] == ["gpt-test", "mock"]
    assert reply_text(second) == "echo: second"
    assert rewarded.status == 201, rewarded.body
    assert rewarded.json()["span_id"] == first.header("x-span-id")
    for answer in (first, live, models, second, rewarded):
        assert answer.version == "HTTP/1.1"
        assert (answer.header("connection") or "").lower() != "close"
    spans = gateway.spans(rollout_id="ka-1")
    assert [(s["seq"], s["attempt_id"], s["status"]) for s in spans] == [
        (1, "a1", "ok"),
        (2, "a1", "ok"),
    ]
    assert [s["span_id"] for s in spans] == [first.header("x-span-id"), second.header("x-span-id")]


def test_two_pipelined_chat_posts_are_answered_in_order_and_both_recorded(
    gateway: GatewayThread,
) -> None:
    calls = "/rollout/pipe-1/v1/chat/completions"
    with Wire(gateway.port) as wire:
        wire.send(chat(calls, "one") + chat(calls, "two"))
        first, second = wire.answer(), wire.answer()
        wire.send(request("GET", "/health/live"))
        after = wire.answer()

    assert [reply_text(first), reply_text(second)] == ["echo: one", "echo: two"]
    assert after.status == 200
    assert [span_of(gateway, a)["request_body"]["messages"] for a in (first, second)] == [
        messages("one"),
        messages("two"),
    ]
    assert len(gateway.spans(rollout_id="pipe-1")) == 2


def test_a_chat_post_pipelined_with_a_health_check_gets_both_answers_in_order(
    gateway: GatewayThread,
) -> None:
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "then a health check") + request("GET", "/health/live"))
        called, live = wire.answer(), wire.answer()
        # And the connection still takes a call after the mix.
        wire.send(chat(CHAT, "still here"))
        again = wire.answer()

    assert reply_text(called) == "echo: then a health check"
    assert (live.status, live.json()) == (200, {"status": "ok"})
    assert reply_text(again) == "echo: still here"
    assert span_of(gateway, called)["request_body"]["messages"] == messages("then a health check")


def test_a_health_check_behind_a_chunked_chat_post_in_one_read_ends_the_connection(
    gateway: GatewayThread,
) -> None:
    """Where a request pipelined behind a chunked POST begins cannot be told without parsing
    the chunks again; HTTP says a client should not pipeline behind a POST, and one that does
    gets the chat's answer, told the connection closes after it, and asks again."""
    body = chat_body("chunked, then a health check")
    sent = request("POST", CHAT, body, framing="chunked") + b"".join(chunks(body, 64))
    with Wire(gateway.port) as wire:
        wire.send(sent + request("GET", "/health/live"))
        called = wire.answer()
        wire.assert_closed(within=5.0)

    assert reply_text(called) == "echo: chunked, then a health check"
    assert (called.header("Connection") or "").lower() == "close"


def test_two_chat_posts_and_a_health_check_behind_a_chunked_one_get_both_chats_answered(
    gateway: GatewayThread,
) -> None:
    """The connection ends only after the last answer it can give."""
    body = chat_body("second, chunked")
    sent = (
        chat(CHAT, "first")
        + request("POST", CHAT, body, framing="chunked")
        + b"".join(chunks(body, 64))
        + request("GET", "/health/live")
    )
    with Wire(gateway.port) as wire:
        wire.send(sent)
        first, second = wire.answer(), wire.answer()
        wire.assert_closed(within=5.0)

    assert reply_text(first) == "echo: first"
    assert (first.header("Connection") or "keep-alive").lower() != "close"
    assert reply_text(second) == "echo: second, chunked"
    assert (second.header("Connection") or "").lower() == "close"


# -- how a request body may arrive -------------------------------------------------------------


def test_expect_100_continue_gets_a_100_before_the_body_is_sent(gateway: GatewayThread) -> None:
    sent = chat(CHAT, "continued", headers=[("Expect", "100-continue")])
    head, _, body = sent.partition(b"\r\n\r\n")
    with Wire(gateway.port) as wire:
        wire.send(head + b"\r\n\r\n")
        interim = wire.answer()
        wire.send(body)
        final = wire.answer()

    assert (interim.version, interim.status, interim.body) == ("HTTP/1.1", 100, b"")
    assert reply_text(final) == "echo: continued"
    assert span_of(gateway, final)["request_body"]["messages"] == messages("continued")


def test_a_chunked_request_body_sent_in_pieces_is_read_whole(gateway: GatewayThread) -> None:
    body = chat_body("sent in pieces")
    with Wire(gateway.port) as wire:
        wire.send(request("POST", "/rollout/te-1/v1/chat/completions", body, framing="chunked"))
        for piece in chunks(body, 16):
            wire.send(piece)
        answer = wire.answer()

    assert reply_text(answer) == "echo: sent in pieces"
    span = span_of(gateway, answer)
    assert (span["rollout_id"], span["status"]) == ("te-1", "ok")
    assert span["request_body"]["messages"] == messages("sent in pieces")


def test_a_gzipped_request_body_is_decoded(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    packed = gzip.compress(chat_body("squeezed"))
    with Wire(gateway.port) as wire:
        wire.send(request("POST", CHAT, packed, headers=[("Content-Encoding", "gzip")]))
        answer = wire.answer()

    assert reply_text(answer) == "echo: squeezed"
    assert span_of(gateway, answer)["request_body"]["messages"] == messages("squeezed")
    assert fake_provider.state.last_request.body["messages"] == messages("squeezed")


def test_a_body_that_claims_gzip_but_is_not_is_a_400_and_the_connection_closes(
    gateway: GatewayThread, fake_provider: FakeProviderThread
) -> None:
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "not squeezed", headers=[("Content-Encoding", "gzip")]))
        answer = wire.answer()
        assert_error(answer, 400, code="invalid_content_encoding")
        assert (answer.header("connection") or "").lower() == "close"
        wire.assert_closed(within=READ_TIMEOUT)

    assert fake_provider.state.snapshot() == []


def test_a_chunked_body_growing_past_max_body_bytes_is_a_413(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread
) -> None:
    gateway = make_gateway(server={"max_body_bytes": MAX_BODY_BYTES})
    body = chat_body("x" * (2 * MAX_BODY_BYTES))
    with Wire(gateway.port) as wire:
        wire.send(request("POST", CHAT, body, framing="chunked"))
        wire.send_until_answered(chunks(body, 512))
        answer = wire.answer()

    error = assert_error(answer, 413, code="request_too_large")
    assert error["type"] == "invalid_request_error"
    assert fake_provider.state.snapshot() == []


# -- deadlines ---------------------------------------------------------------------------------


def test_headers_trickling_in_past_header_timeout_get_the_connection_closed(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(server={"header_timeout": HEADER_TIMEOUT})
    # A byte every 0.1 s: never idle, just never done (the head is sent short of its end).
    head = chat(CHAT, "slow")[:-2]
    with Wire(gateway.port) as wire:
        closed_after = wire.trickle(head, every=0.1)

    assert HEADER_TIMEOUT * 0.9 <= closed_after <= HEADER_TIMEOUT + CLOSE_SLACK, closed_after


def test_an_idle_keep_alive_connection_is_closed_after_header_timeout(
    make_gateway: Callable[..., GatewayThread],
) -> None:
    gateway = make_gateway(server={"header_timeout": HEADER_TIMEOUT})
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "then nothing"))
        assert reply_text(wire.answer()) == "echo: then nothing"
        idle = wire.assert_closed(within=HEADER_TIMEOUT + CLOSE_SLACK)

    assert idle >= HEADER_TIMEOUT * 0.9, idle


# -- closing -----------------------------------------------------------------------------------


def test_an_http_1_0_post_is_answered_then_the_connection_closed(gateway: GatewayThread) -> None:
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "from the past", version="HTTP/1.0"))
        answer = wire.answer()
        wire.assert_closed(within=READ_TIMEOUT)

    # aiohttp answers in the request's version; HTTP/1.1 would be as right (RFC 9110 6.2).
    assert answer.version in ("HTTP/1.0", "HTTP/1.1")
    assert reply_text(answer) == "echo: from the past"
    assert not answer.chunked  # which HTTP/1.0 does not have
    assert answer.header("content-length") == str(len(answer.body))


def test_connection_close_is_answered_then_honoured(gateway: GatewayThread) -> None:
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "last one", headers=[("Connection", "close")]))
        answer = wire.answer()
        wire.assert_closed(within=READ_TIMEOUT)

    assert answer.version == "HTTP/1.1"
    assert reply_text(answer) == "echo: last one"
    assert (answer.header("connection") or "").lower() == "close"


def test_a_malformed_request_line_is_a_400_and_the_gateway_keeps_serving(
    gateway: GatewayThread,
) -> None:
    with Wire(gateway.port) as wire:
        wire.send(b"GARBAGE\r\n\r\n")
        answer = wire.answer()
        wire.assert_closed(within=READ_TIMEOUT)
    # aiohttp's own plain-text 400 ("Invalid method encountered"), in HTTP/1.0.
    assert answer.version.startswith("HTTP/1.")
    assert answer.status == 400

    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "next connection"))
        assert reply_text(wire.answer()) == "echo: next connection"


# -- what an answer looks like -----------------------------------------------------------------


def test_a_streamed_chat_arrives_chunked_ends_with_done_and_leaves_the_connection_usable(
    gateway: GatewayThread,
) -> None:
    calls = "/rollout/sse-1/v1/chat/completions"
    with Wire(gateway.port) as wire:
        wire.send(request("POST", calls, chat_body("stream me", stream=True)))
        streamed = wire.answer()
        wire.send(chat(calls, "after the stream"))
        after = wire.answer()

    assert (streamed.version, streamed.status) == ("HTTP/1.1", 200)
    assert streamed.chunked and streamed.header("content-length") is None
    assert (streamed.header("content-type") or "").startswith("text/event-stream")
    # The final empty chunk came: the answer is whole, and the next one parsed after it.
    assert streamed.chunk_sizes[-1] == 0
    assert streamed.body.endswith(b"\n\ndata: [DONE]\n\n")
    events = [event for event in streamed.body.split(b"\n\n") if event]
    assert all(event.startswith(b"data: ") for event in events)
    deltas = [orjson.loads(event[6:])["choices"] for event in events[:-1]]
    assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c) == "echo: stream me"
    assert reply_text(after) == "echo: after the stream"
    spans = gateway.spans(rollout_id="sse-1")
    assert [(s["seq"], s["stream"], s["status"]) for s in spans] == [(1, 1, "ok"), (2, 0, "ok")]
    assert spans[0]["span_id"] == streamed.header("x-span-id")


def test_a_plain_chat_answer_carries_its_length_type_and_the_gateways_headers(
    gateway: GatewayThread,
) -> None:
    with Wire(gateway.port) as wire:
        wire.send(chat("/rollout/hdr-1/attempt/a7/v1/chat/completions", "headers please"))
        answer = wire.answer()

    assert (answer.version, answer.status) == ("HTTP/1.1", 200)
    assert not answer.chunked and answer.header("transfer-encoding") is None
    assert answer.header("content-length") == str(len(answer.body))
    assert (answer.header("content-type") or "").startswith("application/json")
    assert reply_text(answer) == "echo: headers please"
    span = span_of(gateway, answer)
    assert answer.header("x-trace-id") == span["trace_id"]
    assert answer.header("x-rollout-id") == "hdr-1"
    assert answer.header("x-attempt-id") == "a7"
    assert answer.header("x-upstream-retries") == "0"
    assert float(answer.header("x-gateway-overhead-ms") or "nan") >= 0
    # The upstream's own headers come through as well.
    assert (answer.header("x-request-id") or "").startswith("req_")
