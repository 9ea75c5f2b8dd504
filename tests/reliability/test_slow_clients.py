"""Many slow clients: 500 concurrent streams that trickle from the upstream and are read slowly
do not starve a fast client, whose latency is measured while they run; every stream ends
(complete, or cleanly closed) within a deadline and is recorded."""

from __future__ import annotations

import asyncio
import resource
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from fake_provider import FakeProviderThread
from servers import read_rows, wait_until

from .support import CHAT_PATH, ServeFactory, chat_body

STREAMS = 500
CHUNK_DELAY = 0.05  # upstream: one SSE event every 50 ms
READ_SIZE = 256  # client: 256 bytes ...
READ_PAUSE = 0.1  # ... every 100 ms, slower than the upstream produces
STREAM_DEADLINE = 20.0
FAST_CALLS_MAX = 5_000
FAST_P50_BOUND_MS = 100.0
ROLLOUT = "slow-readers"
# ~25 words, so each stream is ~27 events (~8 KB) and takes a few seconds to read.
PROMPT = " ".join(f"w{i}" for i in range(25))


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for ~2,000 sockets in this process (clients and the fake upstream's ends)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def slow_reader(session: aiohttp.ClientSession, url: str) -> str:
    """One slow streaming client; returns how its stream ended."""
    body = chat_body("gpt-test", PROMPT, stream=True)
    try:
        async with session.post(url, json=body, headers={"X-Rollout-Id": ROLLOUT}) as response:
            if response.status != 200:
                return f"status {response.status}"
            data = bytearray()
            for _ in range(10_000):
                chunk = await response.content.read(READ_SIZE)
                if not chunk:
                    break
                data += chunk
                await asyncio.sleep(READ_PAUSE)  # the slow reading is the behaviour under test
        return "complete" if data.rstrip().endswith(b"data: [DONE]") else "truncated"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        return "closed"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return type(exc).__name__


async def run_slow_readers(base: str) -> list[str]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=STREAM_DEADLINE)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = f"{base}{CHAT_PATH}"
        return await asyncio.gather(*(slow_reader(session, url) for _ in range(STREAMS)))


def timed_call(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post(CHAT_PATH, json=chat_body("mock", "quick"))
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    return elapsed_ms


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_500_slow_streams_do_not_starve_a_fast_client(
    served_process: ServeFactory, fake_provider: FakeProviderThread, many_fds: None
) -> None:
    served = served_process({"gpt-test": fake_provider.url})
    fake_provider.state.add_fault(chunk_delay=CHUNK_DELAY, times=STREAMS)
    outcomes: list[str] = []

    def slow_side() -> None:
        outcomes.extend(asyncio.run(run_slow_readers(served.base)))

    slow = threading.Thread(target=slow_side, name="slow-readers", daemon=True)
    with httpx.Client(base_url=served.base, timeout=10) as client:
        idle = [timed_call(client) for _ in range(30)]
        started = time.monotonic()
        slow.start()
        try:
            wait_until(
                lambda: len(fake_provider.state.requests) >= STREAMS * 0.9,
                timeout=STREAM_DEADLINE,
                what="the slow streams to be under way",
            )
            ramp_up = time.monotonic() - started
            loaded: list[float] = []
            while slow.is_alive() and len(loaded) < FAST_CALLS_MAX:
                loaded.append(timed_call(client))
        finally:
            slow.join(timeout=STREAM_DEADLINE + 5)
        all_done = time.monotonic() - started
    assert not slow.is_alive(), "the slow clients did not finish"

    ended = Counter(outcomes)
    served.signal(signal.SIGTERM)
    assert served.wait(30) == 0, served.log()
    recorded = read_rows(
        served.db, "select count(*) as n from spans where rollout_id = ?", ROLLOUT
    )[0]["n"]
    print(
        f"\nslow clients: {STREAMS} streams ramped up in {ramp_up:.2f}s, all ended after "
        f"{all_done:.2f}s: {dict(ended)}; {recorded} spans recorded\n"
        f"fast client idle: p50 {statistics.median(idle):.1f} ms, "
        f"p90 {percentile(idle, 0.9):.1f} ms\n"
        f"fast client under load ({len(loaded)} calls): p50 {statistics.median(loaded):.1f} ms, "
        f"p90 {percentile(loaded, 0.9):.1f} ms, max {max(loaded):.1f} ms"
    )
    assert len(outcomes) == STREAMS
    assert set(ended) <= {"complete", "closed"}, dict(ended)
    assert ended["complete"] >= STREAMS * 0.99, dict(ended)
    assert recorded == STREAMS
    assert len(loaded) >= 10, "the fast client hardly ran while the streams were open"
    assert statistics.median(loaded) < FAST_P50_BOUND_MS
