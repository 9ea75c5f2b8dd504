"""What PostgreSQL refuses costs at most the record it refuses: an upstream's absurdly long
answer id, a record too big for an index entry, or a lock another replica sits on never
wedges the writer or hides from readiness."""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from conftest import gateway_settings
from fake_provider import FakeProviderThread
from pg import PostgresServer
from servers import GatewayThread, read_rows, wait_until
from shapes import span_record

from gateway.compose import writer_for
from store.backend import libpq_url
from store.writer import StoreWriter

# Random text does not compress: past btree's 2704-byte limit for an index entry.
LONG = "".join(secrets.choice(string.ascii_letters) for _ in range(4000))


@pytest.fixture
def pg_writer(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[str, StoreWriter]]:
    url = postgres.new_database()
    writer = writer_for(url, journal_dir=str(tmp_path), flush_interval=0.05)
    writer.start()
    yield url, writer
    writer.close(timeout=10)


def _settled(writer: StoreWriter) -> bool:
    return writer.settled and writer.healthy


def test_a_long_response_id_is_left_out_and_its_span_stored(
    pg_writer: tuple[str, StoreWriter],
) -> None:
    """It was refused by PostgreSQL's index (`ProgramLimitExceeded`, which psycopg raises as an
    OperationalError), taken for the store being down, and the batch it was in was replayed
    and refused again every second, with every span spilled after it."""
    url, writer = pg_writer
    writer.put(span_record("r-long", 1, response_id="chatcmpl-" + LONG))
    for seq in range(2, 6):
        writer.put(span_record("r-long", seq))
    wait_until(lambda: _settled(writer), timeout=10, what=f"settled: {writer.problems()}")
    rows = read_rows(url, "select seq, response_id from spans order by seq")
    assert [(r["seq"], r["response_id"]) for r in rows] == [(1, None)] + [
        (seq, f"chatcmpl-planted-{seq}") for seq in range(2, 6)
    ]
    assert writer.quarantined == 0


def test_a_record_too_big_for_an_index_is_quarantined_alone(
    pg_writer: tuple[str, StoreWriter],
) -> None:
    """A span id too long for the primary key's index: a record refused, not a store down."""
    url, writer = pg_writer
    writer.put(span_record("r-big", 1, span_id=LONG))
    for seq in range(2, 6):
        writer.put(span_record("r-big", seq))
    wait_until(lambda: _settled(writer), timeout=10, what=f"settled: {writer.problems()}")
    assert writer.quarantined == 1
    rows = read_rows(url, "select seq from spans order by seq")
    assert [r["seq"] for r in rows] == [2, 3, 4, 5]
    assert writer.journal.replay_files() == []


def test_an_upstream_answer_with_a_long_id_keeps_the_replica_ready(
    postgres: PostgresServer, fake_provider: FakeProviderThread, tmp_path: Path
) -> None:
    url = postgres.new_database()
    settings = gateway_settings(
        fake_provider.url, recorder={"journal_dir": str(tmp_path / "journal")}
    )
    gateway = GatewayThread(settings, url).start()
    try:
        answer = {
            "id": "chatcmpl-" + LONG,
            "object": "chat.completion",
            "created": 1,
            "model": "upstream-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        fake_provider.state.add_fault(status=200, body=orjson.dumps(answer).decode())
        chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}
        with httpx.Client(base_url=gateway.url("r-long-id"), timeout=10) as client:
            codes = [client.post("/chat/completions", json=chat).status_code for _ in range(5)]
        assert codes == [200] * 5

        def ready_and_stored() -> Any:
            ready = httpx.get(f"{gateway.base}/health/ready", timeout=5)
            stored = read_rows(url, "select count(*) as n from spans")[0]["n"]
            return ready.status_code == 200 and stored == 5

        wait_until(ready_and_stored, timeout=10, what="ready, with all five calls stored")
    finally:
        gateway.stop()


def test_a_writer_waiting_on_a_lock_held_elsewhere_says_so(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Another replica's writer stalled inside its batch (a paused VM, a lost network) holds
    the batch lock every writer takes. Nothing bounded the wait: this writer hung on it with
    readiness saying all was well. Now the wait ends (`busy_timeout`, at least 2 s on
    PostgreSQL), the span is journaled and the writer says why."""
    url = postgres.new_database()
    writer = writer_for(url, journal_dir=str(tmp_path), flush_interval=0.05, busy_timeout=0.25)
    writer.start()
    other = psycopg.connect(libpq_url(url))
    try:
        other.execute("select pg_advisory_xact_lock(7291)")  # span_inserts' batch lock
        writer.put(span_record("r-locked", 1))
        wait_until(writer.problems, timeout=10, what="the writer to report the lock")
        assert not writer.healthy
    finally:
        other.rollback()
        other.close()
    # Once the lock is free, the journaled span goes in.
    wait_until(lambda: _settled(writer), timeout=10, what=f"settled: {writer.problems()}")
    writer.close(timeout=10)
    assert [r["seq"] for r in read_rows(url, "select seq from spans")] == [1]


def test_batches_touching_the_same_rollouts_in_opposite_orders_never_deadlock(
    pg_writer: tuple[str, StoreWriter],
) -> None:
    """Another replica's batch holds rollout r1 and will want r2. This writer's batch came in
    as r2, r1: it locked r2, waited for r1, and PostgreSQL ended one of the two as a deadlock
    (here the writer spilled and went unready). Now every batch locks its rollouts in order."""
    url, writer = pg_writer
    writer.put(span_record("r1", 1))
    writer.put(span_record("r2", 1))
    wait_until(lambda: writer.written == 2 and _settled(writer), timeout=10)
    other = psycopg.connect(libpq_url(url))
    try:
        other.execute("set lock_timeout = '20s'")
        other.execute("update rollouts set updated_ns = updated_ns where id = 'r1'")
        writer.put(span_record("r2", 2))
        writer.put(span_record("r1", 2))

        def writer_waits() -> bool:
            found = other.execute(
                "select count(*) from pg_stat_activity "
                "where application_name = 'spangate' and wait_event_type = 'Lock'"
            ).fetchone()
            return bool(found and found[0])

        wait_until(writer_waits, timeout=10, what="the writer to wait for r1")
        # The other replica now wants r2: free, unless this writer took it first.
        other.execute("update rollouts set updated_ns = updated_ns where id = 'r2'")
        other.commit()
    finally:
        other.close()
    wait_until(lambda: writer.written == 4 and _settled(writer), timeout=10)
    assert writer.problems() == []


NUL_QUERIES = [
    "/api/patterns?agent=a%00b",
    "/api/patterns?reward_name=a%00b",
    "/api/leaderboard?agent=a%00b",
    "/api/guidelines/a%00b",
    "/api/rollouts?agent=a%00b",
    "/api/rollouts/a%00b",
    "/api/rewards?source=a%00b",
    "/api/spans?rollout_id=a%00b",
]


def test_a_nul_in_a_filter_or_an_id_is_a_422_not_a_500(
    make_gateway: Callable[..., GatewayThread], postgres: PostgresServer
) -> None:
    """PostgreSQL text cannot hold a NUL (SQLite answers these with nothing found)."""
    gateway = make_gateway(db=postgres.new_database())

    with httpx.Client(base_url=gateway.base, timeout=10) as client:
        answers = {path: client.get(path) for path in NUL_QUERIES}

    for path, response in answers.items():
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error", (path, error)
        assert "NUL" in error["message"], (path, error)
