"""The front (gateway/web/front.py) behaves as aiohttp's server did where a review found it
did not: each test runs on both servers (`server.front`), except one that looks inside the
front only."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import GatewayThread, wait_until
from test_http_wire_functional import (
    CHAT,
    READ_TIMEOUT,
    Wire,
    assert_error,
    chat,
    request,
)

from gateway.web.front import FRONTS

FRONTS_UNDER_TEST = pytest.mark.parametrize("front", ["httptools", "aiohttp"])


# -- 1. a chunked body whose framing is broken, in the same read as its head -------------------


@FRONTS_UNDER_TEST
def test_a_malformed_chunked_body_arriving_with_its_head_is_refused_at_once(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, front: str
) -> None:
    """The usual small request arrives in one read. When its chunked framing is broken,
    `_feed` marks the exchange malformed before its task ever ran, so no waiter is set; the
    task's `body()` then waits for a waiter nobody will resolve, and the client gets a 408
    after server.body_timeout (60 s by default) instead of a 400 now."""
    body_timeout = 6.0
    gateway = make_gateway(server={"front": front, "body_timeout": body_timeout})
    sent = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n"  # `zz` is no chunk size
    )
    with Wire(gateway.port) as wire:
        started = time.monotonic()
        wire.send(sent)
        answer = wire.answer()
        took = time.monotonic() - started

    assert answer.status == 400, (answer.status, answer.body[:200])
    assert took < body_timeout / 2, f"answered after {took:.1f}s, i.e. on the body deadline"
    assert fake_provider.state.snapshot() == []


# -- 2. no bound on the size of a request head ---------------------------------------------------


@FRONTS_UNDER_TEST
def test_a_request_head_of_megabytes_is_refused_before_it_is_all_read(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, front: str
) -> None:
    """aiohttp refuses a header line over 8190 bytes (and more than 128 headers) with a 400 and
    hangs up. The front has no limit at all: httptools accumulates the header value, and the
    front its reads (`raw`) and `header_pairs`, for as long as the client keeps sending,
    within server.header_timeout (60 s): memory without bound for one connection. The request
    is then forwarded upstream with its giant header and recorded."""
    gateway = make_gateway(server={"front": front})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
        b"Content-Type: application/json\r\nX-Big: "
    )
    piece = b"a" * 65536
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=READ_TIMEOUT)
    accepted = 0
    try:
        sock.sendall(head)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            # 64 MiB of one header value: a server that bounds heads stops this long before.
            for _ in range(1024):
                sock.sendall(piece)
                accepted += len(piece)
    finally:
        sock.close()
    assert accepted < 16 * 1024 * 1024, f"the server took {accepted} bytes of one header"
    assert fake_provider.state.snapshot() == []


@FRONTS_UNDER_TEST
def test_a_64_kib_header_is_refused_not_forwarded_upstream(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, front: str
) -> None:
    """The same missing limit, short of memory: the front forwards a 64 KiB header to the
    upstream (which refuses it; the client gets the upstream's 400 and a span is recorded)."""
    gateway = make_gateway(server={"front": front})
    sent = chat(CHAT, "big header", headers=[("X-Big", "a" * 65536), ("Connection", "close")])
    with Wire(gateway.port) as wire:
        wire.send(sent)
        answer = wire.answer()

    assert answer.status in (400, 431), answer.status
    assert answer.header("x-span-id") is None, "the call went upstream and was recorded"
    assert gateway.spans() == []


# -- 3. plain answers ignore the client's backpressure ---------------------------------------------


@FRONTS_UNDER_TEST
def test_pipelined_calls_wait_for_a_client_that_reads_none_of_the_answers(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, front: str
) -> None:
    """`_write_plain` hands a whole answer to the transport and never waits for it to drain,
    and `_answered` starts the next pipelined call at once. A client that pipelines calls
    and reads nothing has every one forwarded upstream (paid for) and every answer buffered in
    the gateway's memory. aiohttp stops at the first answer the socket cannot take."""
    gateway = make_gateway(server={"front": front})
    # An embedding of 100k dimensions: an answer of ~2 MB.
    calls, answer_bytes = 30, 2_000_000
    embed = {"model": "gpt-test", "input": "hello", "dimensions": 100_000}
    one = request("POST", "/v1/embeddings", orjson.dumps(embed))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", gateway.port))
    try:
        sock.sendall(one * calls)  # ~5 KB: taken whole whether answers are read or not
        # The kernel buffers of a loopback connection hold a couple of these answers at most;
        # past them a server that respects backpressure takes no further call.
        bound = 6
        try:
            wait_until(
                lambda: len(fake_provider.state.snapshot()) > bound,
                timeout=5,
                what="calls past the backpressure bound",
            )
            went_upstream = len(fake_provider.state.snapshot())
        except AssertionError:
            went_upstream = 0
    finally:
        sock.close()
    assert not went_upstream, (
        f"{went_upstream} calls went upstream for a client that read nothing "
        f"({went_upstream * answer_bytes / 1e6:.0f} MB of answers buffered)"
    )


# -- 4. leading empty lines throw off where a pipelined request begins ---------------------------


@FRONTS_UNDER_TEST
def test_empty_lines_before_a_request_do_not_shift_where_the_next_one_begins(
    make_gateway: Callable[..., GatewayThread], fake_provider: FakeProviderThread, front: str
) -> None:
    """HTTP/1.1 servers ignore empty lines before a request line (RFC 9112 2.2), and so does
    llhttp; `_after_previous` does not: it takes the first CRLFCRLF of `raw` as the end of the
    previous request's head, which is the empty lines themselves when a read starts with two.
    The bytes handed to aiohttp then start inside the previous request: here at a request
    hidden in its body, which aiohttp answers as if it had been sent (a response desync: one
    answer too many on the connection; behind a proxy that shares upstream connections, the
    next client reads it)."""
    gateway = make_gateway(server={"front": front})
    # The previous request: a POST whose body (no JSON: a 400) carries, 20 bytes in, a whole
    # request. With two empty lines before it, `_after_previous` counts its body from the
    # read's start instead of from its blank line: `4 + Content-Length` bytes in. Its head is
    # padded to the length of the hidden request, which puts that count on the hidden request.
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: spangate\r\nX-Pad: " + b"h" * 100 + b"\r\n\r\n"
    body = b"x" * 20 + hidden

    def head_padded(pad: int) -> bytes:
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
            b"Content-Type: application/json\r\nX-Pad: " + b"p" * pad + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )

    head = next(h for pad in range(1, 400) if len(h := head_padded(pad)) == len(hidden))
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "first"))
        assert wire.answer().status == 200
        wire.send(b"\r\n\r\n" + head + body + request("GET", "/health/live"))
        bad_json = wire.answer()
        live = wire.answer()
        # Nothing more: one answer a request.
        wire.sock.settimeout(1.0)
        try:
            extra = wire.pending or wire.sock.recv(65536)
        except TimeoutError:
            extra = b""

    assert_error(bad_json, 400)
    assert (live.status, live.json()) == (200, {"status": "ok"}), (live.status, live.body[:200])
    assert extra == b"", f"an answer to no request: {extra[:200]!r}"


# -- 5. an idle connection keeps its last request's bytes -----------------------------------------


def test_an_idle_keep_alive_connection_holds_no_copy_of_its_last_request(
    gateway: GatewayThread,
) -> None:
    """`raw` (the reads of the request being parsed, kept in case aiohttp must take what
    follows) is reset only when the next read arrives: an idle keep-alive connection keeps up
    to `_RAW_CHUNKS` reads (~2 MiB on uvloop) of its last request after it was answered.
    SDK clients keep pools of idle connections, each of which then pins its last prompt."""
    body_chars = 1_000_000
    with Wire(gateway.port) as wire:
        wire.send(chat(CHAT, "x" * body_chars))
        assert wire.answer().status == 200
        [front] = gateway.app[FRONTS]
        [conn] = wait_until(lambda: list(front.connections), what="the idle connection")
        held = sum(map(len, conn.raw or ()))

    assert held < 64 * 1024, f"an idle connection holds {held} bytes of its last request"
