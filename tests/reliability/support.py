"""Helpers shared by the reliability tests: `spangate serve` as a real process, OpenAI-shape
checks, SSE reading, and counting the sockets this process holds open.

Everything is bounded: every wait has a deadline, every loop a count.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from servers import wait_until

from store.schema import SPAN_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
CHAT_PATH = "/v1/chat/completions"
# The upstream key in served configs: it must never show up in a log.
UPSTREAM_KEY = "sk-reliability-upstream-key"
DONE_LINE = "data: [DONE]"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, groups: dict[str, str], **settings: Any) -> Path:
    """A `spangate.yaml` with one OpenAI-compatible deployment per `{group: api_base}` and the
    built-in `mock` group, plus any top-level `settings`."""
    models: list[dict[str, Any]] = [
        {
            "name": name,
            "deployments": [
                {
                    "provider": "openai",
                    "model": "upstream-model",
                    "api_base": base,
                    "api_key": UPSTREAM_KEY,
                }
            ],
        }
        for name, base in groups.items()
    ]
    models.append({"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]})
    path.write_text(yaml.safe_dump({"models": models, **settings}))
    return path


@dataclass
class ServedProcess:
    """One `spangate serve` subprocess; its output goes to files so a chatty log never blocks."""

    process: subprocess.Popen[bytes]
    base: str
    db: Path
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"spangate serve exited with {self.process.returncode}:\n{self.log()}"
            )
        try:
            return httpx.get(f"{self.base}/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill if still running (tests stop it gracefully themselves) and close the log."""
        if self.process.poll() is None:
            self.process.kill()
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


ServeFactory = Callable[..., ServedProcess]


def start_served(config: Path, db: Path, log_path: Path) -> ServedProcess:
    """Start `spangate serve` on a free port and wait until `/health/ready` answers 200."""
    port = free_port()
    log = open(log_path, "ab")  # noqa: SIM115 - closed by ServedProcess.stop
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from gateway.cli.main import cli; cli()",
            "serve",
            "--config",
            str(config),
            "--db",
            str(db),
            "--port",
            str(port),
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    served = ServedProcess(process, f"http://127.0.0.1:{port}", db, log_path, log)
    try:
        wait_until(served.ready, timeout=READY_TIMEOUT, interval=0.05, what="spangate serve")
    except BaseException:
        served.stop()
        raise
    return served


def span_record(rollout: str | None, seq: int | None, **extra: Any) -> dict[str, Any]:
    """A finished span with every column, shaped like the one `Call.publish` builds."""
    start = time.time_ns() - 10_000_000_000 + (seq or 0) * 1_000_000
    record: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    record.update(
        span_id=os.urandom(8).hex(),
        trace_id=os.urandom(16).hex(),
        rollout_id=rollout,
        attempt_id="1" if rollout else None,
        seq=seq,
        name="chat gpt-test",
        operation="chat",
        provider="openai",
        deployment="openai/upstream-model",
        model_group="gpt-test",
        request_model="gpt-test",
        response_model="upstream-model",
        response_id=f"chatcmpl-planted-{seq}",
        status="ok",
        http_status=200,
        stream=0,
        start_ns=start,
        end_ns=start + 5_000_000,
        duration_ms=5.0,
        overhead_ms=0.4,
        retries=0,
        input_tokens=3,
        output_tokens=4,
        finish_reasons=["stop"],
        request_body=b'{"model":"gpt-test","messages":[]}',
        response_body={"id": f"chatcmpl-planted-{seq}", "choices": []},
        attributes={"gen_ai.operation.name": "chat"},
        tags=["planted"],
        agent=None,
        metadata={},
    )
    record.update(extra)
    return record


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
