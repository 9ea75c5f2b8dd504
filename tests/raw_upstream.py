"""A scripted upstream on a raw socket: each request gets the next script, a list of byte
pieces written with a short pause between them (so they arrive as separate reads), then the
connection is closed. For what aiohttp's server would refuse to send (odd statuses, bodies
that lie about their encoding, SSE events cut mid-character)."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque


class RawUpstream:
    def __init__(self, pause: float = 0.02) -> None:
        self.pause = pause
        self.scripts: deque[list[bytes]] = deque()
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def add(self, *pieces: bytes) -> None:
        self.scripts.append(list(pieces))

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            script = self.scripts.popleft() if self.scripts else [_default()]
            for index, piece in enumerate(script):
                if index:
                    time.sleep(self.pause)
                try:
                    conn.sendall(piece)
                except OSError:
                    return


def _default() -> bytes:
    body = (
        b'{"id":"chatcmpl-raw","object":"chat.completion","created":1,"model":"raw",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    )
    return response(200, body)


def response(
    status: int, body: bytes, content_type: str = "application/json", extra: str = ""
) -> bytes:
    head = (
        f"HTTP/1.1 {status} Whatever\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


def stream_head(status: int = 200, extra: str = "") -> bytes:
    """Headers of an SSE answer whose body runs until the connection closes."""
    return (
        f"HTTP/1.1 {status} OK\r\nContent-Type: text/event-stream\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode()
