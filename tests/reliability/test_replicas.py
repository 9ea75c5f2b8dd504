"""Two `spangate serve` replicas sharing one PostgreSQL store (and, in some tests, one Redis):
what a user of a load-balanced cluster checks."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_provider import FakeProviderThread
from pg import PostgresServer
from redis_server import RedisServer
from servers import read_rows, wait_until

from .support import ServedProcess, start_served, write_config

Replicas = Callable[..., list[ServedProcess]]


@pytest.fixture
def replicas(
    tmp_path: Path, postgres: PostgresServer, fake_provider: FakeProviderThread
) -> Iterator[Replicas]:
    """`replicas(n, **settings)`: n `spangate serve` processes on one fresh PostgreSQL
    database, each with its own journal folder."""
    started: list[ServedProcess] = []

    def start(count: int = 2, **settings: Any) -> list[ServedProcess]:
        url = postgres.new_database()
        for index in range(count):
            config = write_config(
                tmp_path / f"replica-{index}.yaml",
                {"gpt-test": fake_provider.url},
                recorder={"journal_dir": str(tmp_path / f"journal-{index}")},
                **settings,
            )
            started.append(start_served(config, url, tmp_path / f"replica-{index}.log"))  # type: ignore[arg-type]
        return started[-count:]

    yield start
    for served in started:
        served.stop()


def chat(replica: ServedProcess, rollout: str, text: str = "hi") -> Any:
    client = openai.OpenAI(
        base_url=f"{replica.base}/rollout/{rollout}/v1", api_key="unused", max_retries=0
    )
    try:
        return client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": text}]
        )
    finally:
        client.close()


def stored_seqs(db: str, rollout: str) -> list[int]:
    rows = read_rows(db, "select seq from spans where rollout_id = ? order by seq", rollout)
    return [row["seq"] for row in rows]


@pytest.mark.parametrize("counter", ["postgresql", "redis"])
def test_one_rollouts_calls_alternating_between_replicas_are_numbered_1_to_n(
    replicas: Replicas, counter: str, request: pytest.FixtureRequest
) -> None:
    settings: dict[str, Any] = {}
    if counter == "redis":
        redis = request.getfixturevalue("redis_server")
        redis.flush()
        settings["shared"] = {"redis_url": redis.url}
    first, second = replicas(2, **settings)
    calls = 12
    headers = [chat((first, second)[i % 2], "r-alt", f"call {i}").headers for i in range(calls)]
    assert {h["x-rollout-id"] for h in headers} == {"r-alt"}
    wait_until(lambda: len(stored_seqs(str(first.db), "r-alt")) == calls, timeout=10)
    assert stored_seqs(str(first.db), "r-alt") == list(range(1, calls + 1))


def test_concurrent_calls_of_one_rollout_on_two_replicas_get_no_gaps_or_duplicates(
    replicas: Replicas,
) -> None:
    first, second = replicas(2)
    errors: list[BaseException] = []

    def burst(replica: ServedProcess) -> None:
        try:
            for i in range(10):
                chat(replica, "r-race", f"{replica.base} {i}")
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=burst, args=(r,)) for r in (first, second) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    wait_until(lambda: len(stored_seqs(str(first.db), "r-race")) == 40, timeout=10)
    assert stored_seqs(str(first.db), "r-race") == list(range(1, 41))
    (rollout,) = read_rows(str(first.db), "select count(*) as n from rollouts where id = 'r-race'")
    assert rollout["n"] == 1


def test_a_reward_posted_to_one_replica_is_read_from_another(replicas: Replicas) -> None:
    first, second = replicas(2)
    response = chat(first, "r-reward")
    response_id = response.parse().id
    wait_until(lambda: stored_seqs(str(first.db), "r-reward") == [1], timeout=10)
    posted = httpx.post(
        f"{first.base}/api/rewards",
        json={"response_id": response_id, "value": 0.75, "id": "rw-cross"},
        timeout=10,
    )
    assert posted.status_code == 201, posted.text
    rollout = httpx.get(f"{second.base}/api/rollouts/r-reward", timeout=10).json()
    assert [(r["id"], r["value"]) for r in rollout["rewards"]] == [("rw-cross", 0.75)]


def test_the_span_stream_of_one_replica_shows_calls_made_on_another(replicas: Replicas) -> None:
    first, second = replicas(2)
    seen: list[str] = []
    connected = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", f"{second.base}/api/spans/stream", timeout=20) as response:
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    connected.set()
                if line.startswith("data:") and '"r-sse"' in line:
                    seen.append(line)
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert connected.wait(10)
    chat(first, "r-sse")
    # Within a second of the write (the writer's flush interval comes first).
    wait_until(lambda: seen, timeout=3, what="the span on the other replica's stream")


@pytest.fixture
def shared_redis(redis_server: RedisServer) -> dict[str, Any]:
    redis_server.flush()
    return {"redis_url": redis_server.url}


def test_an_rpm_limit_holds_across_replicas_with_redis(
    replicas: Replicas, fake_provider: FakeProviderThread, shared_redis: dict[str, Any]
) -> None:
    limited = {
        "name": "limited",
        "deployments": [
            {
                "provider": "openai",
                "model": "upstream-model",
                "api_base": fake_provider.url,
                "api_key": "sk-upstream",
                "rpm": 6,
            }
        ],
    }
    first, second = replicas(2, shared=shared_redis, rate_limit_wait=0, models=[limited])
    statuses = []
    for i in range(10):
        replica = (first, second)[i % 2]
        response = httpx.post(
            f"{replica.base}/v1/chat/completions",
            json={"model": "limited", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        statuses.append(response.status_code)
    assert statuses.count(200) == 6, statuses
    assert statuses.count(429) == 4, statuses


def test_a_breaker_opened_on_one_replica_is_open_on_another_within_a_second(
    replicas: Replicas, fake_provider: FakeProviderThread, shared_redis: dict[str, Any]
) -> None:
    first, second = replicas(
        2,
        shared=shared_redis,
        retries={"attempts": 1},
        circuit_breaker={"fail_max": 3, "reset_timeout": 30},
    )
    # The second replica has just read the breaker closed (and trusts that for 0.2 s).
    assert chat_status(second) == 200
    fake_provider.state.add_fault(status=500, times=3)
    for _ in range(3):
        assert chat_status(first) == 500
    opened = time.monotonic()

    def refused() -> httpx.Response | None:
        response = httpx.post(
            f"{second.base}/v1/chat/completions",
            json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        return response if response.status_code == 503 else None

    response = wait_until(refused, timeout=1.0, interval=0.05)
    assert time.monotonic() - opened < 1.0
    assert response.json()["error"]["code"] == "no_healthy_deployment"
    assert 25 <= int(response.headers["retry-after"]) <= 31
    # From then on it fails fast: nothing more reaches the upstream.
    before = len(fake_provider.state.requests_to("/v1/chat/completions"))
    assert chat_status(second) == 503
    assert len(fake_provider.state.requests_to("/v1/chat/completions")) == before


def chat_status(replica: ServedProcess) -> int:
    return httpx.post(
        f"{replica.base}/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    ).status_code


def test_sigkill_of_one_replica_under_load_loses_nothing_outside_the_window(
    replicas: Replicas, tmp_path: Path
) -> None:
    first, second = replicas(2)
    acked: list[tuple[float, str]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=first.base, timeout=5) as client:
            i = 0
            while not stop.is_set():
                try:
                    response = client.post(
                        f"/rollout/r-kill-{worker}/v1/chat/completions",
                        json={
                            "model": "gpt-test",
                            "messages": [{"role": "user", "content": f"{i}"}],
                        },
                    )
                except httpx.TransportError:
                    return  # the replica is gone
                if response.status_code == 200:
                    acked.append((time.monotonic(), response.headers["x-span-id"]))
                i += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    wait_until(lambda: len(acked) >= 100, timeout=30, what="load on the first replica")
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait(timeout=10)
    stop.set()
    for worker in workers:
        worker.join(timeout=10)
    # The other replica goes on.
    assert [chat(second, "r-after").status_code for _ in range(3)] == [200] * 3
    # A replacement on the same journal volume replays what the dead one journaled.
    replacement = start_served(tmp_path / "replica-0.yaml", first.db, tmp_path / "replacement.log")
    try:
        window = 1.0  # recorder.max_unsaved_seconds
        must_have = {span for at, span in acked if at < killed_at - window}
        db = str(first.db)

        def stored() -> set[str]:
            return {r["span_id"] for r in read_rows(db, "select span_id from spans")}

        wait_until(lambda: must_have <= stored(), timeout=20, what="every acked span")
        lost = {span for _, span in acked} - stored()
        # Whatever is missing was answered within the window before the kill.
        assert all(at >= killed_at - window for at, span in acked if span in lost)
    finally:
        replacement.stop()
