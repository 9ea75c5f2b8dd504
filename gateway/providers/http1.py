"""The upstream HTTP/1.1 client: keep-alive connections per origin, responses parsed by httptools.

It spends about a third of the CPU per call of aiohttp's client (bench/http_clients.py), the
largest stage of a proxied call, by doing only what OpenAICompatible asks of it.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlencode, urlsplit

import httptools

from config.version import package_version

# Past this many unread body bytes the socket stops being read until the caller catches up.
_HIGH_WATER = 256 * 1024
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_UNENCODED = frozenset({"", "identity"})
# A compressed body is decoded this much at a time, so a small bomb never expands in one go.
_PIECE = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The client frames the request itself; a caller's own would contradict it.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
_ACCEPT_ENCODING = "gzip, deflate"


class HTTPClientError(Exception):
    """The exchange failed: the connection could not be made or broke, or the answer was not
    HTTP. `mid_body` says whether the status line and headers had already arrived."""

    mid_body = False


class ConnectionBroken(HTTPClientError):
    """The connection closed or failed before the whole answer arrived."""


class StaleConnection(ConnectionBroken):
    """A reused keep-alive connection closed before a byte of the answer came back: most
    likely the upstream closed it while idle just as the request went out. Never resent
    here: the upstream may have read the request before it closed (a worker that died)."""


class BadResponse(HTTPClientError):
    """What came back does not parse as an HTTP/1.1 response, or uses an unknown encoding."""


class UnsendableHeader(HTTPClientError):
    """A header to send holds a line break or cannot be encoded: it would split the request."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: the origin's connection key, its Host header and the path."""

    scheme: str
    host: str
    port: int
    host_header: str
    path: str


@functools.lru_cache(maxsize=1024)
def parse_target(url: str) -> Target:
    """A URL split once per deployment and path; ValueError when it is not an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, host_header, path)


def _request_bytes(
    method: str, target: Target, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
) -> bytes:
    path = target.path
    if query:
        path += ("&" if "?" in path else "?") + urlencode(query)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host_header}"]
    names = set()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _FRAMING:
            continue
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value or "\0" in value:
            raise UnsendableHeader(f"header {name!r} cannot be sent as it is")
        lines.append(f"{name}: {value}")
        names.add(lowered)
    if "accept-encoding" not in names:
        lines.append(f"Accept-Encoding: {_ACCEPT_ENCODING}")
    if "user-agent" not in names:
        lines.append(f"User-Agent: spangate/{package_version()}")
    if body or method not in ("GET", "HEAD", "DELETE"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise UnsendableHeader(f"a header cannot be encoded: {exc}") from None
    return head + body if body else head


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer in flight on it; httptools calls the on_*."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = True
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.in_flight = False
        self.answered = False  # a byte of the answer arrived
        # A message after the answer, in the same read: no caller's, and the end of the line.
        self.stray = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight or self.complete:
            # Nothing was asked (a 408 before an idle timeout, a second answer): whatever it
            # is belongs to no caller, and the connection can no longer be trusted.
            self.fail(BadResponse("the upstream sent data no request asked for"))
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(BadResponse("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(BadResponse(f"the upstream's answer is not HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.complete or self.error is not None:
            return
        if self.head_done and exc is None and self._until_eof():
            self.complete = True  # a body without a length ends when the connection does
            self.keep_alive = False
            self._wake()
            return
        broken = ConnectionBroken(
            f"the upstream closed the connection{': ' + str(exc) if exc else ''}"
        )
        self.fail(broken)

    def pause_writing(self) -> None:  # bodies are small; the transport buffers them
        pass

    def resume_writing(self) -> None:
        pass

    # httptools
    def on_message_begin(self) -> None:
        if self.complete:
            self.stray = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers after a chunked body are not headers
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.stray:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # an interim answer (100 Continue, 103 Early Hints): skipped
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.stray:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.stray or not self.head_done:
            return  # the end of an interim answer
        self.complete = True
        self._wake()

    # for Response
    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = error
            self._wake()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def time_out(self) -> None:
        self.fail(TimeoutError())  # made only when it fires: most calls never get here

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _until_eof(self) -> bool:
        framing = {name.lower(): value.lower() for name, value in self.headers}
        return "content-length" not in framing and "chunked" not in framing.get(
            "transfer-encoding", ""
        )

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        )


class _Inflater:
    """A compressed body decoded in pieces: gzip members one after another, `deflate` with or
    without the zlib header, and an error (not a short body) when the stream stops early."""

    def __init__(self, wbits: int) -> None:
        self.wbits = wbits
        self.decoder = zlib.decompressobj(wbits)
        self.started = False

    def pieces(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                out = self.decoder.decompress(data, _PIECE)
            except zlib.error as exc:
                if self.wbits == zlib.MAX_WBITS and not self.started:
                    # `deflate` sent raw, without the zlib header it should carry.
                    self.wbits = -zlib.MAX_WBITS
                    self.decoder = zlib.decompressobj(self.wbits)
                    continue
                raise BadResponse(f"the upstream's compressed body is corrupt: {exc}") from None
            self.started = True
            if out:
                yield out
            data = self.decoder.unconsumed_tail
            if not data and self.decoder.eof and self.decoder.unused_data:
                data = self.decoder.unused_data  # the next gzip member
                self.decoder = zlib.decompressobj(self.wbits)

    def end(self) -> bytes:
        rest = self.decoder.flush()
        if not self.decoder.eof:
            raise BadResponse("the upstream's compressed body ended before its end marker")
        return rest


class Response:
    """An answer whose status and headers are in; the body is read or iterated once, then
    `release()` gives the connection back (or closes it when the body was left unread)."""

    __slots__ = ("_conn", "_deadline", "_decoder", "_key", "_pool", "headers", "status")

    def __init__(
        self,
        conn: _Connection,
        pool: ConnectionPool,
        key: tuple[str, str, int],
        deadline: asyncio.TimerHandle,
    ) -> None:
        self._conn, self._pool, self._key, self._deadline = conn, pool, key, deadline
        self.status = conn.status
        self.headers = conn.headers
        self._decoder: _Inflater | None = None
        encoding = self.header("content-encoding", "").strip().lower()
        if encoding not in _UNENCODED:
            wbits = _DECODERS.get(encoding)
            if wbits is None:
                self.close()
                raise BadResponse(f"the upstream used an unknown content-encoding {encoding!r}")
            self._decoder = _Inflater(wbits)

    def header(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    @property
    def content_type(self) -> str:
        return self.header("content-type").split(";", 1)[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value.isdigit() else None

    @property
    def encoded(self) -> bool:
        return self._decoder is not None

    async def _next_raw(self) -> bytes | None:
        conn = self._conn
        while not conn.chunks:
            if conn.error is not None:
                error = conn.error
                if isinstance(error, HTTPClientError):
                    error.mid_body = True
                raise error
            if conn.complete:
                return None
            await conn.wait()
        return conn.take()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives, decoded (at most 64 KiB a piece then)."""
        decoder = self._decoder
        while (data := await self._next_raw()) is not None:
            if decoder is None:
                yield data
            else:
                for piece in decoder.pieces(data):
                    yield piece
        if decoder is not None and (rest := decoder.end()):
            yield rest

    async def read(self, limit: int) -> bytes:
        """The whole body, decoded; BodyOverLimit past `limit` bytes (the rest never read)."""
        conn = self._conn
        if conn.complete and self._decoder is None and conn.buffered <= limit:
            return conn.take() if conn.chunks else b""
        body = bytearray()
        async for piece in self.iter_chunks():
            body += piece
            if len(body) > limit:
                raise BodyOverLimit
        return bytes(body)

    def release(self) -> None:
        """Done with the answer: a wholly read one leaves its connection open for the next."""
        self._deadline.cancel()
        conn = self._conn
        if conn.reusable() and not conn.chunks:
            self._pool.put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        self._deadline.cancel()
        self._conn.close()


def _drop_expired(idle: deque[_Connection], oldest: float) -> None:
    # The coldest wait at the left end, where taking never reaches while the warm ones
    # suffice: expired or dropped ones are closed here instead of lingering after a burst.
    while idle and (idle[0].lost or idle[0].idle_since < oldest):
        idle.popleft().close()


class BodyOverLimit(Exception):
    """`Response.read` passed its limit; the caller closes and reports it."""


class ConnectionPool:
    """Idle keep-alive connections per origin (LIFO: the warmest first), opened on demand,
    unlimited in number like the aiohttp connector it replaces (`limit=0`)."""

    def __init__(self, *, keepalive: float = 60.0) -> None:
        self.keepalive = keepalive
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    def put(self, key: tuple[str, str, int], conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = conn.idle_since = time.monotonic()
        conn.reset()
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        idle.append(conn)
        _drop_expired(idle, now - self.keepalive)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close what expired while no call came to take or return a connection."""
        self._sweeper = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            _drop_expired(idle, now - self.keepalive)
            if not idle:
                del self._idle[key]
        if self._idle and not self._closed:
            coldest = min(idle[0].idle_since for idle in self._idle.values())
            wait = max(coldest + self.keepalive - now, 0.0) + 0.001  # just past its expiry
            self._sweeper = asyncio.get_running_loop().call_later(wait, self._sweep)

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        oldest = time.monotonic() - self.keepalive
        while idle:
            conn = idle.pop()
            transport = conn.transport
            usable = conn.error is None and not conn.lost
            if usable and transport is not None and not transport.is_closing():
                if conn.idle_since >= oldest:
                    return conn
                transport.close()
        return None

    async def _open(self, target: Target, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if target.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"cannot connect to {target.host_header}: {exc}") from None
        return conn

    async def request(
        self,
        method: str,
        target: Target,
        *,
        headers: Mapping[str, str],
        body: bytes = b"",
        query: Mapping[str, str] | None = None,
        total: float,
        connect: float,
    ) -> Response:
        """Send one request and wait for its status and headers. TimeoutError once `total`
        seconds pass (reading the body included: until `release()`), or `connect` to connect."""
        if self._closed:
            raise ConnectionBroken("the upstream client is closed")
        if method == "HEAD":
            # The parser cannot know an answer to HEAD has no body; nothing here sends one.
            raise ValueError("HEAD is not supported")
        payload = _request_bytes(method, target, query or {}, headers, body)
        loop = asyncio.get_running_loop()
        started = loop.time()
        key = (target.scheme, target.host, target.port)
        conn = self._take(key)
        reused = conn is not None
        if conn is None:
            conn = await self._open(target, min(connect, total))
        deadline = loop.call_at(started + total, conn.time_out)
        try:
            assert conn.transport is not None
            conn.in_flight = True
            conn.transport.write(payload)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except ConnectionBroken as exc:
            deadline.cancel()
            conn.close()
            if reused and not conn.answered:
                raise StaleConnection(str(exc)) from None
            raise
        except BaseException:
            deadline.cancel()
            conn.close()
            raise
        return Response(conn, self, key, deadline)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
