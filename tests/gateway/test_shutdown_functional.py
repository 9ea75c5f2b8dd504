"""`spangate serve` as a real process: SIGTERM under load loses no acknowledged call."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from fake_provider import FakeProviderThread
from servers import ServeFactory, read_rows, wait_until

CALLS = 120
WORKERS = 24


@pytest.fixture
def served(
    fake_provider: FakeProviderThread, served_process: ServeFactory
) -> tuple[subprocess.Popen[bytes], str, Path]:
    process = served_process({"gpt-test": fake_provider.url})
    return process.process, process.base, process.db


def test_sigterm_under_load_keeps_every_acknowledged_call(
    served: tuple[subprocess.Popen[bytes], str, Path], fake_provider: FakeProviderThread
) -> None:
    process, base, db = served
    fake_provider.state.latency = 0.05
    acknowledged: list[str] = []
    lock = threading.Lock()
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}

    def worker(index: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(CALLS // WORKERS):
                try:
                    response = client.post(f"/rollout/load-{index}/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return  # the listener closed: this call was never acknowledged
                if response.status_code == 200:
                    with lock:
                        acknowledged.append(response.headers["X-Span-Id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= CALLS // 4, timeout=20, what="load to build up")
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=30)
    assert process.wait(timeout=30) == 0
    stored = {row["span_id"] for row in read_rows(db, "select span_id from spans")}
    assert acknowledged, "no call was acknowledged before SIGTERM"
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged calls have no span"


def test_spans_survive_a_restart_of_the_process(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, base, db = served
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "remember me"}]}
    response = httpx.post(f"{base}/rollout/keep/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    rows = read_rows(db, "select span_id, rollout_id, seq from spans")
    assert rows == [{"span_id": response.headers["X-Span-Id"], "rollout_id": "keep", "seq": 1}]
