"""The HTTP/1.1 server on the gateway's port: OpenAI calls are parsed (httptools) and answered
here, and every other request, or any unusual one, is handed, connection and all, to aiohttp.

aiohttp's server costs more CPU per call than the whole rest of a bare Python hop
(bench/results/hop_floors-c64.md); the proxy routes are the hot path, everything else is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from config.models import Settings
from gateway.errors import BodyTooLarge, InvalidRequest, RequestTimeout
from gateway.web.auth import admit_key, presented_key
from gateway.web.limits import bound_send_buffer, within
from gateway.web.middleware import failure_answer
from gateway.web.responses import Plain
from gateway.web.routes_openai import OPERATIONS, proxy
from gateway.web.state import GATEWAY, Gateway

log = logging.getLogger("spangate.http")

# The routes answered here, as aiohttp would match them: one OpenAI operation, under no prefix,
# a rollout's or an attempt's. A path with an escape (`%`) goes to aiohttp, which decodes it.
_PROXY_PATH = re.compile(
    r"(?:/rollout/(?P<rollout_id>[^/{}%]+)(?:/attempt/(?P<attempt_id>[^/{}%]+))?)?"
    r"/v1/(?P<operation>" + "|".join(re.escape(path) for path in OPERATIONS) + ")"
)
# Requests aiohttp handles better than a lean parser should: it decodes compressed bodies,
# answers `Expect: 100-continue` and refuses upgrades.
_HANDED_OVER_HEADERS = frozenset({b"content-encoding", b"expect", b"upgrade"})
# Bytes of later requests held while one is answered, before the client is read no more.
_MAX_PENDING = 256 * 1024
# Reads of one request kept whole (`FrontConnection.raw`) so that one pipelined behind it can be
# handed to aiohttp; past them (a long body) such a request ends the connection instead.
_RAW_CHUNKS = 8
_REASONS = {status.value: status.phrase for status in HTTPStatus}
# Where a request's head ends: its first blank line.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# A request line and headers past this many bytes go to aiohttp, which refuses them with its
# own limits (8190 bytes a line or field, 128 fields): the front holds no more of them.
_MAX_HEAD = 64 * 1024
_MAX_FIELD, _MAX_FIELDS = 8190, 128
_DATE, _SERVER = 1, 2
_OWN = {"date": _DATE, "server": _SERVER}


class _Clock:
    """The `Date` header, formatted once a second rather than once an answer."""

    second = 0
    line = b""

    @classmethod
    def date_line(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.line


class Front:
    """The server's shared state: the app it serves, its connections, whether it is stopping."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server, grace: float) -> None:
        self.gw: Gateway = app[GATEWAY]
        settings: Settings = self.gw.settings
        self.aiohttp_server = aiohttp_server
        self.keys = settings.auth.keys
        self.max_body = settings.server.max_body_bytes
        self.header_timeout = settings.server.header_timeout
        self.grace = grace
        self.connections: set[FrontConnection] = set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def connection(self) -> FrontConnection:
        if self._sweeper is None:
            self._sweep()
        return FrontConnection(self)

    def _sweep(self) -> None:
        """Close connections that have waited too long for a whole request (slow headers, idle
        keep-alive): one timer for them all, so no call arms and cancels its own."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.header_timeout
        for conn in [c for c in self.connections if c.waiting_since < deadline]:
            conn.close()
        tick = min(max(self.header_timeout / 4, 0.05), 1.0)
        self._sweeper = loop.call_later(tick, self._sweep)

    def stop(self) -> None:
        """No new requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.exchanges:
                conn.close()

    async def shutdown(self) -> None:
        """Give calls still running `grace` seconds, then cancel them (aiohttp does the same
        for its own handlers, in `AppRunner.cleanup`)."""
        self.stop()
        tasks = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=self.grace)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=self.grace)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


# The fronts listening for an app: its shutdown stops them (the app is frozen by the time one
# starts, so the hook is added with the app, by `attach_fronts`).
FRONTS = web.AppKey("fronts", list[Front])


def attach_fronts(app: web.Application) -> None:
    app[FRONTS] = []
    app.on_shutdown.append(_shut_fronts)


async def _shut_fronts(app: web.Application) -> None:
    for front in app[FRONTS]:
        await front.shutdown()


class FrontSite(web.TCPSite):
    """`web.TCPSite` whose connections start on the front instead of aiohttp."""

    def __init__(self, runner: web.AppRunner, front: Front, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self.front = front

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.front.connection,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        self.front.stop()


async def start_front(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    grace: float,
    backlog: int = 128,
    reuse_address: bool | None = None,
) -> FrontSite:
    """Listen on `host:port` with the front before aiohttp; `runner` must be set up."""
    assert runner.server is not None
    front = Front(runner.app, runner.server, grace)
    runner.app[FRONTS].append(front)
    site = FrontSite(runner, front, host, port, backlog=backlog, reuse_address=reuse_address)
    await site.start()
    return site


class FrontExchange:
    """One request taken by the front (`gateway.web.exchange.Exchange`)."""

    __slots__ = (
        "chunks",
        "complete",
        "conn",
        "ended",
        "gw",
        "headers",
        "http11",
        "keep_alive",
        "malformed",
        "match_info",
        "method",
        "operation",
        "path",
        "size",
        "streaming",
        "waiter",
    )

    def __init__(
        self,
        conn: FrontConnection,
        path: str,
        match: re.Match[str],
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self.conn, self.gw = conn, conn.front.gw
        self.method, self.path = "POST", path
        self.operation = OPERATIONS[match["operation"]]
        self.match_info: Mapping[str, str] = {
            k: v for k, v in match.groupdict().items() if v and k != "operation"
        }
        self.headers: MultiMapping[str] = headers
        self.keep_alive, self.http11 = keep_alive, http11
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = self.streaming = self.ended = self.malformed = False
        self.waiter: asyncio.Future[None] | None = None

    async def body(self, timeout: float) -> bytes:
        if not self.complete and not self.malformed and self.size <= self.conn.front.max_body:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self.waiter
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"the request body did not arrive within {timeout:g}s (server.body_timeout)"
                ) from exc
            finally:
                self.waiter = None
        if self.malformed:
            raise InvalidRequest("the request body is malformed (its chunked framing)")
        limit = self.conn.front.max_body
        if self.size > limit:
            raise BodyTooLarge(
                f"request body too large: Maximum request body size {limit} exceeded, "
                f"actual body size {self.size}"
            )
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    def client_gone(self) -> bool:
        return self.conn.lost or self.conn.transport is None or self.conn.transport.is_closing()

    async def begin_stream(self, status: int, headers: dict[str, str]) -> None:
        conn = self.conn
        if self.client_gone():
            raise ConnectionResetError("the client went away")
        bound_send_buffer(conn.transport)
        self.streaming = True
        if self.http11 and conn.keeps(self):
            framing = "Transfer-Encoding: chunked"
        elif self.http11:
            framing = "Transfer-Encoding: chunked\r\nConnection: close"
        else:
            # An HTTP/1.0 client cannot read chunks: its stream ends when the connection does.
            framing = "Connection: close"
        if framing.endswith("close"):
            self.keep_alive = False
        conn.transport.write(conn.head(status, headers, framing))

    async def send(self, data: bytes, timeout: float) -> None:
        if not data:
            return
        if self.http11:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        await self.conn.write(data, timeout)

    async def end(self, timeout: float) -> None:
        if self.http11:
            await self.conn.write(b"0\r\n\r\n", timeout)
        self.ended = True


class FrontConnection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one at a time in order."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: Any = None  # uvloop's transport is no asyncio.Transport subclass
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        # The exchanges parsed and not yet answered; the first is being handled by `task`.
        self.exchanges: deque[FrontExchange] = deque()
        self.task: asyncio.Task[None] | None = None
        # The request being parsed: its URL, its headers, and the reads from its first byte on
        # (None when where it begins is not known), in case aiohttp is to take it.
        self.url = b""
        self.header_pairs: list[tuple[str, str]] = []
        self.handed_over_header = False
        self.raw: list[bytes] | None = None
        self.parsing: FrontExchange | None = None
        # Between `on_message_begin` and `on_message_complete`: the next read is no request's
        # beginning.
        self.mid_message = False
        # Set when a request completed since `raw` began: the next one in it is pipelined.
        self.follows = False
        # Between `on_message_begin` and `on_headers_complete`, and the bytes read meanwhile.
        self.in_head = False
        self.head_size = 0
        # Set once a request is not the front's: nothing after it is parsed here. `hand_over`
        # says aiohttp takes the connection from its first byte once the answers before it
        # are out; else the connection ends after them (its beginning lies somewhere in a
        # read behind a chunked body, which only a client pipelining after a POST, which HTTP
        # says it should not, can send).
        self.ignore_rest = False
        self.hand_over = False
        # Bytes that arrived while a request was being answered, parsed after it.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.reading_paused = False
        self.writing_paused = False
        self.drain: asyncio.Future[None] | None = None
        self.waiting_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.front.connections.add(self)
        self.waiting_since = asyncio.get_running_loop().time()
        if self.front.closing:
            transport.close()

    def data_received(self, data: bytes) -> None:
        # A request's own body is parsed as it comes; the next request waits for its turn.
        if self.pending or (self.exchanges and self.parsing is None):
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > _MAX_PENDING and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.front.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.drain is not None and not self.drain.done():
            self.drain.set_exception(ConnectionResetError("the client went away"))
            self.drain.exception()  # read here, so an unawaited one is not logged

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.mid_message = self.in_head = True
        if self.ignore_rest:
            return
        if self.follows:
            # Pipelined: this request came in the same read as the end of the one before.
            self.raw = self._after_previous()
        self.url = b""
        self.header_pairs = []
        self.handed_over_header = False

    def on_url(self, url: bytes) -> None:
        if not self.ignore_rest:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.ignore_rest:
            return
        if name.lower() in _HANDED_OVER_HEADERS or len(value) > _MAX_FIELD:
            self.handed_over_header = True  # aiohttp's to take, or to refuse
        self.header_pairs.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        if self.ignore_rest:
            return
        if len(self.url) > _MAX_FIELD or len(self.header_pairs) > _MAX_FIELDS:
            self.handed_over_header = True
        path = self.url.partition(b"?")[0].decode("utf-8", "surrogateescape")
        match = _PROXY_PATH.fullmatch(path)
        parser = self.parser
        if match is None or self.handed_over_header or parser.get_method() != b"POST":
            self._not_ours()
            return
        self.in_head = False
        headers = CIMultiDictProxy(CIMultiDict(self.header_pairs))
        http11 = parser.get_http_version() == "1.1"
        ex = FrontExchange(self, path, match, headers, parser.should_keep_alive(), http11)
        self.parsing = ex
        self.exchanges.append(ex)
        if len(self.exchanges) == 1:
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.size += len(body)
        if ex.size <= self.front.max_body:
            ex.chunks.append(body)
        elif ex.waiter is not None and not ex.waiter.done():
            ex.waiter.set_result(None)  # the handler answers 413 now

    def on_message_complete(self) -> None:
        self.mid_message = False
        self.follows = True
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        ex.complete = True
        if ex.waiter is not None and not ex.waiter.done():
            ex.waiter.set_result(None)

    # the connection's own steps

    def _feed(self, data: bytes) -> None:
        """Parse `data`, which begins a request or continues the one being parsed."""
        if not self.mid_message:
            self.raw = [data]
            self.follows = False
            self.head_size = len(data)
        else:
            if self.in_head:
                self.head_size += len(data)
            if self.raw is not None:
                if self.parsing is not None and len(self.raw) >= _RAW_CHUNKS:
                    self.raw = None  # a long body: held once, in its exchange, is enough
                else:
                    self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            ex = self.parsing
            if ex is not None:
                # The body's framing broke: its handler answers 400, and the connection ends.
                ex.malformed = True
                if ex.waiter is not None and not ex.waiter.done():
                    ex.waiter.set_result(None)
                self.parsing = None
                self.ignore_rest, self.hand_over = True, False
            elif not self.ignore_rest:
                self._not_ours()  # aiohttp answers malformed requests its own way
        if self.in_head and not self.ignore_rest and self.head_size > _MAX_HEAD:
            self._not_ours()  # a head this long is aiohttp's to refuse
        self._hand_over_or_close()
        if not self.mid_message and not self.hand_over:
            self.raw = None  # an idle connection keeps no copy of its last request

    def _hand_over_or_close(self) -> None:
        if self.ignore_rest and not self.exchanges:
            if self.hand_over:
                self._hand_over()
            else:
                self.close()

    def _not_ours(self) -> None:
        """aiohttp takes the request, and the connection with it, once the answers before it
        are out; when where it begins cannot be told, the connection ends after them."""
        self.hand_over = self.raw is not None
        # Nothing more of this connection is the front's.
        self.ignore_rest = True

    def _after_previous(self) -> list[bytes] | None:
        """The bytes from where the request just completed ends, when its length can be told
        (a `Content-Length` or no body; not chunks)."""
        if self.raw is None:
            return None
        length = 0
        for name, value in self.header_pairs:
            lowered = name.lower()
            if lowered == "transfer-encoding":
                return None
            if lowered == "content-length":
                if not value.strip().isdigit():
                    return None
                length = int(value)
        joined = b"".join(self.raw)
        # The first blank line after the request line ends the head; blank lines before the
        # request line (which HTTP allows, and the parser skips) are no end of anything.
        head_end = _HEAD_END.search(joined, len(joined) - len(joined.lstrip(b"\r\n")))
        if head_end is None:
            return None
        return [joined[head_end.end() + length :]]

    def _hand_over(self) -> None:
        assert self.raw is not None
        data = b"".join(self.raw) + b"".join(self.pending)
        self.pending, self.pending_size = [], 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.front.connections.discard(self)
        handler = self.front.aiohttp_server()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if self.writing_paused:
            handler.pause_writing()  # aiohttp waits for the client as the front did
        handler.data_received(data)

    def _start(self, ex: FrontExchange) -> None:
        self.waiting_since = float("inf")
        self.task = asyncio.get_running_loop().create_task(self._answer(ex))

    async def _answer(self, ex: FrontExchange) -> None:
        gw = ex.gw
        gw.request_began()
        try:
            try:
                if self.front.keys:
                    admit_key(self.front.keys, presented_key(ex.headers), "proxy")
                plain = await proxy(ex, ex.operation)
            except Exception as exc:
                if ex.streaming:
                    # A second answer written into a stream would read as garbage.
                    log.exception("failed after its answer began: POST %s", ex.path)
                    self.close()
                    return
                plain = failure_answer(exc, ex.method, ex.path)
            if plain is not None:
                with contextlib.suppress(ConnectionError):
                    await self._write_plain(ex, plain)
        finally:
            gw.request_ended()
            self._answered(ex)

    def keeps(self, ex: FrontExchange, close: bool = False) -> bool:
        """Whether the connection serves another request after this one's answer."""
        if self.ignore_rest and not self.hand_over and len(self.exchanges) == 1:
            return False  # the last answer this connection gives
        return ex.keep_alive and ex.complete and not close and not self.front.closing

    async def _write_plain(self, ex: FrontExchange, plain: Plain) -> None:
        """Write the answer, and wait (up to `server.write_timeout`) for a client that is
        behind: the next pipelined request goes upstream only once this one is read."""
        if self.lost:
            return
        keep = self.keeps(ex, plain.close)
        if keep:
            framing = f"Content-Length: {len(plain.body)}"
            if not ex.http11:
                framing += "\r\nConnection: keep-alive"
        else:
            framing = f"Content-Length: {len(plain.body)}\r\nConnection: close"
        if not keep:
            ex.keep_alive = False
        answer = self.head(plain.status, plain.headers, framing) + plain.body
        await self.write(answer, ex.gw.settings.server.write_timeout)

    def head(self, status: int, headers: dict[str, str], framing: str) -> bytes:
        """The status line and headers of an answer, `framing` (Content-Length, chunks or
        close) included; `Date` and `Server` unless the upstream sent its own."""
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        own = 0
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                continue  # never a header split in two
            lines.append(f"{name}: {value}\r\n")
            if name[0] in "DdSs":
                own |= _OWN.get(name.lower(), 0)
        lines.append(framing)
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        if not own & _DATE:
            head += _Clock.date_line()
        if not own & _SERVER:
            head += b"Server: spangate\r\n"
        return head + b"\r\n"

    async def write(self, data: bytes, timeout: float) -> None:
        """Hand `data` to the transport; when the client is behind, wait for it to catch up
        for at most `timeout` seconds, then drop it (`ClientTooSlow`)."""
        transport = self.transport
        if self.lost or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing connection")
        transport.write(data)
        if not self.writing_paused:
            return
        self.drain = asyncio.get_running_loop().create_future()
        try:
            await within(transport, self.drain, timeout)
        finally:
            self.drain = None

    def _answered(self, ex: FrontExchange) -> None:
        """The next request's turn, or the connection's end."""
        self.exchanges.popleft()
        self.task = None
        if self.lost or self.transport.is_closing():
            return
        # An answer that told the client the connection closes (`keeps`, when written) sets
        # `keep_alive` off; one that was cut short leaves nothing to go on from.
        if not (ex.keep_alive and ex.complete) or (ex.streaming and not ex.ended):
            self.close()
            return
        if self.exchanges:
            self._start(self.exchanges[0])
            return
        if self.hand_over and not self.front.closing:
            self._hand_over()
            return
        if self.ignore_rest or self.front.closing:
            self.close()
            return
        self.waiting_since = asyncio.get_running_loop().time()
        if self.pending:
            data, self.pending, self.pending_size = b"".join(self.pending), [], 0
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            self._feed(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
