"""The upstream HTTP/1.1 client (gateway/providers/http1.py) against real loopback servers that
answer byte for byte: keep-alive, bodies of every framing, compression, TLS, and each way an
upstream can break."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from certs import self_signed_localhost

from gateway.providers.http1 import (
    BadResponse,
    BodyOverLimit,
    ConnectionBroken,
    ConnectionPool,
    Response,
    StaleConnection,
    UnsendableHeader,
    parse_target,
)

# Every test runs on the loop the gateway serves with and on asyncio's own.
pytestmark = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"ok":true}'


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by Content-Length), as the server received them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answer(body: bytes = BODY, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


@asynccontextmanager
async def serving(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A server on a free loopback port; yields its base URL and every connection it took."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    host = "localhost" if tls else "127.0.0.1"
    try:
        yield f"{scheme}://{host}:{port}/v1/chat/completions", connections
    finally:
        server.close()
        for writer in connections:
            writer.close()


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(answer())
        await writer.drain()


def replying(raw: bytes) -> Handler:
    """A server that reads one request, sends `raw` as it is and hangs up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()

    return handler


async def send(pool: ConnectionPool, url: str, *, total: float = 5.0) -> Response:
    """A chat-like POST; the caller reads the answer and releases it."""
    return await pool.request(
        "POST",
        parse_target(url),
        headers={"content-type": "application/json"},
        body=b"{}",
        total=total,
        connect=5.0,
    )


async def post(pool: ConnectionPool, url: str, *, total: float = 5.0) -> bytes:
    response = await send(pool, url, total=total)
    try:
        return await response.read(1 << 20)
    finally:
        response.release()


def test_one_connection_carries_call_after_call(loop: str) -> None:
    async def run() -> None:
        async with serving(keep_answering) as (url, connections):
            pool = ConnectionPool()
            for _ in range(5):
                assert await post(pool, url) == BODY
            assert len(connections) == 1
            await pool.close()

    run_on(loop, run())


def test_request_line_and_headers_sent_as_given(loop: str) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(answer())

    async def run() -> None:
        async with serving(handler) as (url, _):
            pool = ConnectionPool()
            response = await pool.request(
                "POST",
                parse_target(url),
                headers={"authorization": "Bearer k", "x-trace": "1"},
                body=b'{"a":1}',
                query={"api-version": "2024-10-01"},
                total=5,
                connect=5,
            )
            assert response.status == 200
            assert await response.read(100) == BODY
            response.release()
            await pool.close()

    run_on(loop, run())
    head, body = seen[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions?api-version=2024-10-01 HTTP/1.1"
    assert "authorization: Bearer k" in lines and "x-trace: 1" in lines
    assert "Content-Length: 7" in lines and body == b'{"a":1}'
    assert any(line.startswith("Host: 127.0.0.1:") for line in lines)


def test_a_connection_the_upstream_closed_while_idle_is_not_reused(loop: str) -> None:
    one_then_close = replying(answer())

    async def run() -> None:
        async with serving(one_then_close) as (url, connections):
            pool = ConnectionPool()
            assert await post(pool, url) == BODY
            # The server closed its side; the pool notices before the next call.
            idle = pool._idle[("http", "127.0.0.1", parse_target(url).port)]
            while not idle[0].lost:
                await asyncio.sleep(0.005)  # poll: the close is seen when the loop runs
            assert await post(pool, url) == BODY
            assert len(connections) == 2
            await pool.close()

    run_on(loop, run())


def test_a_connection_idle_past_keepalive_is_replaced(loop: str) -> None:
    async def run() -> None:
        async with serving(keep_answering) as (url, connections):
            pool = ConnectionPool(keepalive=0.0)
            assert await post(pool, url) == BODY
            assert await post(pool, url) == BODY
            assert len(connections) == 2
            await pool.close()

    run_on(loop, run())


def test_connections_left_over_from_a_burst_are_closed_once_idle_too_long(loop: str) -> None:
    closed: list[int] = []

    async def answer_until_closed(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await keep_answering(reader, writer)
        finally:
            closed.append(1)

    async def until_closed(count: int, pool: ConnectionPool, url: str, *, call: bool) -> None:
        deadline = time.monotonic() + 5
        while len(closed) < count:
            assert time.monotonic() < deadline, "idle connections were never closed"
            if call:
                assert await post(pool, url) == BODY
            await asyncio.sleep(0.01)  # poll

    async def run() -> None:
        async with serving(answer_until_closed) as (url, connections):
            pool = ConnectionPool(keepalive=0.05)
            await asyncio.gather(*(post(pool, url) for _ in range(3)))
            assert len(connections) == 3
            # One call at a time needs one connection; the two others expire behind it.
            await until_closed(2, pool, url, call=True)
            # Then no call comes at all: the pool's own timer closes the last one.
            await until_closed(3, pool, url, call=False)
            assert not pool._idle and len(connections) == 3
            await pool.close()

    run_on(loop, run())


def test_a_reused_connection_closed_before_any_answer_is_named_stale_and_never_resent(
    loop: str,
) -> None:
    bodies: list[bytes] = []

    async def one_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bodies.append((await read_request(reader))[1])
        writer.write(answer())
        await writer.drain()
        bodies.append((await read_request(reader))[1])  # read, worked on, never answered

    async def run() -> None:
        async with serving(one_then_hang_up) as (url, connections):
            pool = ConnectionPool()
            assert await post(pool, url) == BODY
            with pytest.raises(StaleConnection):
                await post(pool, url)
            # The upstream may have done the work: the retry policy decides, not the pool.
            assert len(bodies) == 2 and len(connections) == 1
            assert await post(pool, url) == BODY  # the next call opens a fresh connection
            assert len(connections) == 2
            # A fresh connection that breaks the same way is plainly broken, not stale.
            fresh = ConnectionPool()
            async with serving(replying(b"")) as (silent_url, _):
                with pytest.raises(ConnectionBroken) as broken:
                    await post(fresh, silent_url)
                assert not isinstance(broken.value, StaleConnection)
            await pool.close()

    run_on(loop, run())


def test_a_reused_connection_that_broke_mid_answer_is_plainly_broken(loop: str) -> None:
    async def one_then_half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer())
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # then hangs up

    async def run() -> None:
        async with serving(one_then_half) as (url, connections):
            pool = ConnectionPool()
            assert await post(pool, url) == BODY
            with pytest.raises(ConnectionBroken) as broken:
                await post(pool, url)
            assert not isinstance(broken.value, StaleConnection)
            assert len(connections) == 1
            await pool.close()

    run_on(loop, run())


def test_bodies_framed_by_chunks_or_by_close_and_interim_answers(loop: str) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b'{"ok"', b":true}"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    until_close = replying(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY)

    async def run() -> None:
        pool = ConnectionPool()
        for handler in (chunked, until_close):
            async with serving(handler) as (url, _):
                assert await post(pool, url) == BODY
        await pool.close()

    run_on(loop, run())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_answers_are_decoded_read_whole_or_streamed(loop: str, encoding: str) -> None:
    packed = gzip.compress(BODY) if encoding == "gzip" else zlib.compress(BODY)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            assert b"Accept-Encoding: gzip, deflate" in head
            writer.write(answer(packed, extra=f"Content-Encoding: {encoding}\r\n"))

    async def run() -> None:
        async with serving(handler) as (url, _):
            pool = ConnectionPool()
            assert await post(pool, url) == BODY
            response = await send(pool, url)
            assert b"".join([c async for c in response.iter_chunks()]) == BODY
            response.release()
            await pool.close()

    run_on(loop, run())


def test_data_on_an_idle_connection_is_nobodys_answer(loop: str) -> None:
    unsolicited = asyncio.Event()

    async def then_a_stray_408(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        writer.write(answer(b"stray", status="408 Request Timeout"))
        await writer.drain()
        unsolicited.set()
        await keep_answering(reader, writer)

    async def run() -> None:
        async with serving(then_a_stray_408) as (url, connections):
            pool = ConnectionPool()
            assert await post(pool, url) == b"first"
            await unsolicited.wait()
            assert await post(pool, url) == b"first"  # asked again, on a new connection
            assert len(connections) == 2
            await pool.close()

    run_on(loop, run())


@pytest.mark.parametrize(
    "encoded",
    [
        gzip.compress(BODY[:5]) + gzip.compress(BODY[5:]),  # two gzip members
        zlib.compress(BODY)[2:-4],  # raw deflate, without the zlib header
    ],
    ids=["gzip-members", "raw-deflate"],
)
def test_every_form_of_a_compressed_body_is_decoded_whole(loop: str, encoded: bytes) -> None:
    encoding = "gzip" if encoded[:2] == b"\x1f\x8b" else "deflate"

    handler = replying(answer(encoded, extra=f"Content-Encoding: {encoding}\r\n"))

    async def run() -> None:
        async with serving(handler) as (url, _):
            assert await post(ConnectionPool(), url) == BODY

    run_on(loop, run())


def test_a_compressed_body_cut_short_is_an_error_not_a_short_answer(loop: str) -> None:
    cut = gzip.compress(b"x" * 3000)[:-12]

    handler = replying(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n" + cut)

    async def run() -> None:
        async with serving(handler) as (url, _):
            with pytest.raises(BadResponse, match="ended before"):
                await post(ConnectionPool(), url)

    run_on(loop, run())


def test_a_streamed_compressed_body_is_decoded_a_bounded_piece_at_a_time(loop: str) -> None:
    bomb = gzip.compress(b"\0" * 20_000_000)

    handler = replying(answer(bomb, extra="Content-Encoding: gzip\r\n"))

    async def run() -> None:
        async with serving(handler) as (url, _):
            pool = ConnectionPool()
            response = await send(pool, url)
            sizes = [len(piece) async for piece in response.iter_chunks()]
            response.release()
            assert sum(sizes) == 20_000_000 and max(sizes) <= 64 * 1024
            await pool.close()

    run_on(loop, run())


def test_trailers_after_a_chunked_body_are_not_taken_for_headers(loop: str) -> None:
    handler = replying(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Late\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\nX-Late: 1\r\n\r\n" % (len(BODY), BODY)
    )

    async def run() -> None:
        async with serving(handler) as (url, _):
            pool = ConnectionPool()
            response = await send(pool, url)
            assert await response.read(100) == BODY
            assert response.header("x-late") == ""
            response.release()
            await pool.close()

    run_on(loop, run())


def test_a_body_past_the_limit_is_refused_even_when_it_is_a_small_compressed_one(loop: str) -> None:
    bomb = gzip.compress(b" " * 5_000_000)

    handler = replying(answer(bomb, extra="Content-Encoding: gzip\r\n"))

    async def run() -> None:
        async with serving(handler) as (url, _):
            pool = ConnectionPool()
            response = await send(pool, url)
            assert len(bomb) < 100_000
            with pytest.raises(BodyOverLimit):
                await response.read(100_000)
            response.close()
            await pool.close()

    run_on(loop, run())


def test_each_way_of_breaking_is_named(loop: str) -> None:
    garbage = replying(b"this is not http\r\n\r\n")

    cut = replying(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)  # an upstream that never answers: the behaviour under test

    brotli = replying(answer(b"\x0b", extra="Content-Encoding: br\r\n"))

    async def run() -> None:
        pool = ConnectionPool()
        async with serving(garbage) as (url, _):
            with pytest.raises(BadResponse):
                await post(pool, url)
        async with serving(cut) as (url, _):
            with pytest.raises(ConnectionBroken) as broken:
                await post(pool, url)
            assert broken.value.mid_body
        async with serving(silent) as (url, _):
            with pytest.raises(TimeoutError):
                await post(pool, url, total=0.2)
        async with serving(brotli) as (url, _):
            with pytest.raises(BadResponse, match="content-encoding"):
                await post(pool, url)
        async with serving(keep_answering) as (url, _):
            target = parse_target(url)
            for unsendable in ({"x-a": "1\r\nx-b: 2"}, {"x a": "1"}, {"x-a": "1\0"}):
                with pytest.raises(UnsendableHeader):
                    await pool.request("POST", target, headers=unsendable, total=5, connect=5)
            with pytest.raises(ValueError, match="HEAD"):
                await pool.request("HEAD", target, headers={}, total=5, connect=5)
        with pytest.raises(ConnectionBroken, match="cannot connect"):
            await post(pool, url)  # the server is gone: nothing listens there now
        await pool.close()

    run_on(loop, run())


def test_https_upstreams_are_verified_against_the_system_trust_store(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_tls, cert_file = self_signed_localhost(tmp_path)

    async def run() -> None:
        async with serving(keep_answering, tls=server_tls) as (url, connections):
            with pytest.raises(ConnectionBroken, match="CERTIFICATE_VERIFY_FAILED"):
                await post(ConnectionPool(), url)
            # Trusted the way OpenSSL is told of a private CA: SSL_CERT_FILE.
            monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
            pool = ConnectionPool()
            assert await post(pool, url) == BODY
            assert await post(pool, url) == BODY
            assert len(connections) == 1  # the refused handshake never got this far
            await pool.close()

    run_on(loop, run())
