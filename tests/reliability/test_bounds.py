"""Nothing a client or an upstream sends exhausts `spangate serve`: a 200 MB upstream body,
300 clients that never read their streams, 2,000 idle event-stream subscribers, and clients
that send headers or a body a byte at a time while the gateway is told to stop. Memory and
CPU are read from /proc for the served process."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from fake_provider import FakeProviderThread
from servers import read_rows, wait_until

from .support import CHAT_PATH, ServeFactory, chat_body

MB = 1024 * 1024
HUGE_BODY = 200 * MB
RSS_GROWTH_BOUND = 64 * MB
NON_READERS = 300
# Per dropped client: its stalled socket buffers, the upstream read buffer and what the
# record had assembled when it stalled (~0.5 MB measured); far from unbounded growth.
NON_READER_GROWTH_BOUND = NON_READERS * MB
WRITE_TIMEOUT = 2.0
SUBSCRIBERS = 2_000
CPU_WINDOW = 3.0
IDLE_CPU_BOUND = 0.20  # of one core
SHUTDOWN_TIMEOUT = 2.0


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for a few thousand sockets here and in the served process, which inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_200_mb_upstream_body_is_refused_without_holding_it(
    served_process: ServeFactory, fake_provider: FakeProviderThread
) -> None:
    served = served_process(
        {"gpt-test": fake_provider.url}, limits={"max_upstream_body_bytes": 8 * MB}
    )
    pid = served.process.pid
    before = status_kb(pid, "VmRSS") * 1024
    fake_provider.state.add_fault(huge_body=HUGE_BODY)
    response = httpx.post(f"{served.base}/rollout/huge{CHAT_PATH}", json=chat_body(), timeout=60)
    peak = status_kb(pid, "VmHWM") * 1024
    print(f"\n200 MB upstream body: RSS {before / MB:.1f} MB before, peak {peak / MB:.1f} MB")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_too_large"
    assert peak - before < RSS_GROWTH_BOUND
    rows = wait_until(
        lambda: read_rows(served.db, "select status, http_status, error_type from spans"),
        timeout=10,
        what="the span",
    )
    assert rows == [{"status": "error", "http_status": 502, "error_type": "upstream_too_large"}]


def _non_reader(port: int) -> socket.socket:
    sock = socket.socket()
    # A tiny receive window, so the gateway's writes stall after a few kilobytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = orjson.dumps(chat_body(stream=True))
    sock.sendall(
        b"POST /rollout/non-readers/v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_300_clients_that_never_read_are_dropped_and_memory_stays_bounded(
    served_process: ServeFactory, fake_provider: FakeProviderThread, many_fds: None
) -> None:
    served = served_process(
        {"gpt-test": fake_provider.url}, server={"write_timeout": WRITE_TIMEOUT}
    )
    pid = served.process.pid
    port = int(served.base.rsplit(":", 1)[1])
    before = status_kb(pid, "VmRSS") * 1024
    fake_provider.state.add_fault(endless=True, times=NON_READERS)
    sockets = [_non_reader(port) for _ in range(NON_READERS)]
    try:

        def dropped() -> int:
            return read_rows(
                served.db,
                "select count(*) as n from spans where status = 'cancelled' "
                "and http_status = 499 and error_type = 'client_closed'",
            )[0]["n"]

        wait_until(
            lambda: dropped() == NON_READERS, timeout=60, interval=0.2, what="every client dropped"
        )
        peak = status_kb(pid, "VmHWM") * 1024
        after = status_kb(pid, "VmRSS") * 1024
    finally:
        for sock in sockets:
            sock.close()
    print(
        f"\n{NON_READERS} non-reading clients: RSS {before / MB:.1f} MB before, "
        f"peak {peak / MB:.1f} MB, {after / MB:.1f} MB once dropped"
    )
    assert peak - before < NON_READER_GROWTH_BOUND
    # The upstream streams were let go as well, not left running for nobody.
    wait_until(
        lambda: sum(r.disconnected for r in fake_provider.state.snapshot()) == NON_READERS,
        timeout=30,
        what="the upstream streams to be closed",
    )


def _subscribe(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /api/spans/stream HTTP/1.1\r\nHost: spangate\r\n\r\n")
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_2000_idle_event_stream_subscribers_cost_little_cpu(
    served_process: ServeFactory, many_fds: None
) -> None:
    served = served_process(server={"max_sse_subscribers": SUBSCRIBERS + 10})
    pid = served.process.pid
    port = int(served.base.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    try:
        for _ in range(SUBSCRIBERS):
            sockets.append(_subscribe(port))
        for sock in sockets:
            assert b": connected" in _read_until(sock, b": connected")
        rss = status_kb(pid, "VmRSS") * 1024
        started, cpu_before = time.monotonic(), cpu_seconds(pid)
        time.sleep(CPU_WINDOW)  # the idle window whose CPU use is measured
        share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
        # One call wakes every subscriber through the one shared wake-up.
        call = httpx.post(f"{served.base}/rollout/sse{CHAT_PATH}", json=chat_body("mock"))
        assert call.status_code == 200
        span_id = call.headers["X-Span-Id"].encode()
        for sock in sockets[:: SUBSCRIBERS // 20]:
            assert span_id in _read_until(sock, span_id)
    finally:
        for sock in sockets:
            sock.close()
    print(
        f"\n{SUBSCRIBERS} idle subscribers: {share * 100:.1f}% of one core over "
        f"{CPU_WINDOW:g}s, RSS {rss / MB:.1f} MB"
    )
    assert share < IDLE_CPU_BOUND


def test_slowloris_clients_do_not_hold_up_sigterm(served_process: ServeFactory) -> None:
    """Clients still sending headers, or a body, a byte at a time when SIGTERM lands: the
    gateway exits within its shutdown timeout instead of waiting on them."""
    served = served_process(
        server={"shutdown_timeout": SHUTDOWN_TIMEOUT, "body_timeout": 60, "header_timeout": 60}
    )
    port = int(served.base.rsplit(":", 1)[1])
    body = orjson.dumps(chat_body("mock"))
    headers_only = socket.create_connection(("127.0.0.1", port), timeout=10)
    body_trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        headers_only.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
        body_trickle.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: spangate\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        body_trickle.sendall(body[:3])
        wait_until(lambda: "spangate_" in httpx.get(f"{served.base}/metrics").text, what="serving")
        signalled = time.monotonic()
        served.signal(signal.SIGTERM)
        for index in range(3, 40):
            # Keep trickling, as a slowloris does, until the gateway hangs up on us.
            with contextlib.suppress(OSError):
                body_trickle.sendall(body[index : index + 1])
                headers_only.sendall(b"s")
            if served.process.poll() is not None:
                break
            time.sleep(0.1)  # the trickle is the behaviour under test
        code = served.wait(30)
        exited_after = time.monotonic() - signalled
    finally:
        headers_only.close()
        body_trickle.close()
    print(f"\nslowloris vs SIGTERM: exit {code} after {exited_after:.2f}s")
    assert code == 0, served.log()
    assert exited_after < SHUTDOWN_TIMEOUT + 3 * 2.0 + 2.0
