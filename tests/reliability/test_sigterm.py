"""SIGTERM under load: `spangate serve` stops accepting, finishes what is in flight, drains the
recorder and exits 0, and every call a client got in full has its span in the database."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import read_rows, wait_until

from .support import (
    CHAT_PATH,
    DONE_LINE,
    UPSTREAM_KEY,
    Ledger,
    ServeFactory,
    chat_body,
    data_lines,
    run_load,
)

WORKERS = 16
CALLS_PER_WORKER = 40
ACKS_BEFORE_SIGNAL = 60
EXIT_TIMEOUT = 30.0
# Bounds the wait for a call that never completes, so a regression costs seconds, not 30.
SHUTDOWN_TIMEOUT = 5.0


@pytest.fixture
def slow_provider() -> Iterator[FakeProviderThread]:
    """A second upstream, so one deliberately slow stream is in flight when the signal lands."""
    with FakeProviderThread() as provider:
        yield provider


def test_sigterm_under_load_records_every_acknowledged_call(
    served_process: ServeFactory,
    fake_provider: FakeProviderThread,
    slow_provider: FakeProviderThread,
) -> None:
    fake_provider.state.latency = 0.02
    served = served_process(
        {"gpt-test": fake_provider.url, "slow": slow_provider.url},
        server={"shutdown_timeout": SHUTDOWN_TIMEOUT},
    )
    ledger, stop = Ledger(), threading.Event()
    threads = run_load(
        served.base, ledger, stop, workers=WORKERS, calls_per_worker=CALLS_PER_WORKER
    )
    # One stream that takes ~1 s upstream: it must still finish after the signal.
    slow_provider.state.add_fault(chunk_delay=0.15)
    slow_lines: list[str] = []
    slow_headers: dict[str, str] = {}
    slow_started = threading.Event()

    def slow_stream() -> None:
        with (
            httpx.Client(base_url=served.base, timeout=20) as client,
            client.stream(
                "POST",
                f"/rollout/slow{CHAT_PATH}",
                json=chat_body("slow", "one two three", stream=True),
            ) as response,
        ):
            slow_headers.update(response.headers)
            slow_started.set()
            slow_lines.extend(line for line in response.iter_lines() if line)

    slow = threading.Thread(target=slow_stream, daemon=True)
    try:
        wait_until(
            lambda: ledger.count() >= ACKS_BEFORE_SIGNAL, timeout=20, what="load to build up"
        )
        slow.start()
        wait_until(slow_started.is_set, timeout=10, what="the slow stream to start")
        served.signal(signal.SIGTERM)
        code = served.wait(EXIT_TIMEOUT)
    finally:
        stop.set()
        for thread in [*threads, slow]:
            if thread.ident is not None:
                thread.join(timeout=30)

    assert code == 0, served.log()
    assert "Traceback" not in served.log(), served.log()
    assert UPSTREAM_KEY not in served.log()
    stored = {row["span_id"] for row in read_rows(served.db, "select span_id from spans")}
    acknowledged = ledger.snapshot()
    missing = set(acknowledged) - stored
    print(
        f"\nSIGTERM: {len(acknowledged)} calls acknowledged, {len(stored)} spans stored, "
        f"{len(missing)} acknowledged without a span; client failures: {ledger.failures}"
    )
    assert len(acknowledged) >= ACKS_BEFORE_SIGNAL
    # Nothing was processed and then lost on the way back: every stored span was delivered.
    undelivered = stored - set(acknowledged) - {slow_headers.get("x-span-id")}
    assert not undelivered, f"{len(undelivered)} calls were recorded but never reached the client"
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged calls have no span"
    # The stream in flight at SIGTERM was finished, not cut, and was recorded.
    assert slow_lines and slow_lines[-1] == DONE_LINE, slow_lines
    assert len(data_lines(slow_lines)) >= 4
    assert slow_headers["x-span-id"] in stored


def _listener_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def _read_response(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_answers_a_call_whose_body_arrives_after_the_signal(
    served_process: ServeFactory,
) -> None:
    """A call the gateway accepted before SIGTERM (headers read, `100 Continue` sent) is
    answered even though its body arrives after the listener closed."""
    served = served_process(server={"shutdown_timeout": SHUTDOWN_TIMEOUT})
    port = int(served.base.rsplit(":", 1)[1])
    body = orjson.dumps(chat_body("mock"))
    with socket.create_connection(("127.0.0.1", port), timeout=SHUTDOWN_TIMEOUT + 2) as sock:
        sock.sendall(
            b"POST /rollout/late-body/v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 100"), "the call was not accepted"
        signalled = time.monotonic()
        served.signal(signal.SIGTERM)
        wait_until(lambda: _listener_closed(port), timeout=10, what="the listener to close")
        sock.sendall(body)
        answer = _read_response(sock, signalled + SHUTDOWN_TIMEOUT + 2)
        answered_after = time.monotonic() - signalled
    code = served.wait(EXIT_TIMEOUT)
    exited_after = time.monotonic() - signalled
    print(f"\nlate body: answered after {answered_after:.2f}s, exit after {exited_after:.2f}s")
    assert answer.startswith(b"HTTP/1.1 200"), (
        f"no answer for an accepted call ({answer[:200]!r}); the gateway waited "
        f"{answered_after:.1f}s (shutdown_timeout is {SHUTDOWN_TIMEOUT}s) and dropped it"
    )
    assert code == 0
    span_ids = [row["span_id"] for row in read_rows(served.db, "select span_id from spans")]
    assert len(span_ids) == 1
    assert f"x-span-id: {span_ids[0]}".encode() in answer.lower()
    assert exited_after < SHUTDOWN_TIMEOUT, "shutdown waited out the whole timeout"
