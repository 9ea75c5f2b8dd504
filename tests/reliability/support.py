"""Helpers shared by the reliability tests: `spangate serve` as a real process, OpenAI-shape
checks, SSE reading, and counting the sockets this process holds open.

Everything is bounded: every wait has a deadline, every loop a count.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from servers import (  # noqa: F401 - re-exported: the one launcher lives in servers.py
    UPSTREAM_KEY,
    ServedProcess,
    ServeFactory,
    free_port,
    start_served,
    wait_until,
    write_config,
)
from shapes import span_record  # noqa: F401 - re-exported

CHAT_PATH = "/v1/chat/completions"
# The upstream key in served configs: it must never show up in a log.
DONE_LINE = "data: [DONE]"


# -- OpenAI shapes ------------------------------------------------------------------------


def chat_body(model: str = "gpt-test", text: str = "hi", *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body


def openai_error(body: bytes) -> dict[str, Any] | None:
    """The `error` object when `body` is OpenAI's error shape (message and type strings)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    if not isinstance(error.get("message"), str) or not error["message"]:
        return None
    if not isinstance(error.get("type"), str) or not error["type"]:
        return None
    return error


def is_complete_completion(body: bytes) -> bool:
    """A whole, parseable chat completion (what a client that got a 200 relies on)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("choices"))


def data_lines(lines: list[str]) -> list[str]:
    """The payloads of the SSE `data:` lines, in order."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


def stream_error_event(lines: list[str]) -> dict[str, Any] | None:
    """The first SSE event that carries an OpenAI-shaped `error` object, if any."""
    for data in data_lines(lines):
        if data == "[DONE]":
            continue
        error = openai_error(data.encode())
        if error is not None:
            return error
    return None


# -- leaks --------------------------------------------------------------------------------


def open_sockets() -> int:
    """Sockets this process holds (every thread: gateway, fake provider, clients)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
    return count


def socket_ports() -> list[tuple[int, int]]:
    """(local port, remote port) of every TCP socket this process holds, from /proc/net/tcp*;
    a listener has remote port 0."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: list[tuple[int, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[9] in inodes:
                    local, remote = fields[1], fields[2]
                    ports.append(
                        (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
                    )
    return ports


# -- load ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What load clients saw: acknowledged span ids (with when) and how the rest ended."""

    acknowledged: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, span_id: str) -> None:
        with self.lock:
            self.acknowledged[span_id] = time.monotonic()

    def fail(self, kind: str) -> None:
        with self.lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(self.acknowledged)


def one_call(client: httpx.Client, path: str, body: dict[str, Any], ledger: Ledger) -> bool:
    """Make one call; record its span id if the client got all of it. False: stop calling."""
    try:
        if body.get("stream"):
            with client.stream("POST", path, json=body) as response:
                lines = list(_bounded_lines(response.iter_lines()))
                status, span_id = response.status_code, response.headers.get("X-Span-Id")
            complete = status == 200 and bool(lines) and lines[-1] == DONE_LINE
        else:
            response = client.post(path, json=body)
            status, span_id = response.status_code, response.headers.get("X-Span-Id")
            complete = status == 200 and is_complete_completion(response.content)
    except httpx.TransportError as exc:
        ledger.fail(type(exc).__name__)
        return False
    if complete and span_id:
        ledger.ack(span_id)
        return True
    ledger.fail(f"status {status}" if status != 200 else "incomplete body")
    return False


def _bounded_lines(lines: Iterator[str], limit: int = 10_000) -> Iterator[str]:
    for count, line in enumerate(lines):
        if count >= limit:
            raise AssertionError("stream did not end within the line limit")
        if line:
            yield line


def run_load(
    base: str,
    ledger: Ledger,
    stop: threading.Event,
    *,
    workers: int,
    calls_per_worker: int,
    model: str = "gpt-test",
) -> list[threading.Thread]:
    """Start `workers` threads, each making up to `calls_per_worker` calls (every other one a
    stream) on its own rollout until a call fails or `stop` is set."""

    def worker(index: int) -> None:
        with httpx.Client(base_url=base, timeout=15) as client:
            for number in range(calls_per_worker):
                if stop.is_set():
                    return
                body = chat_body(model, f"call {number}", stream=(index + number) % 2 == 1)
                if not one_call(client, f"/rollout/load-{index}{CHAT_PATH}", body, ledger):
                    return

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    return threads
