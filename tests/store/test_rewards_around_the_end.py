"""A rollout's end and the rewards given around it: a reward is at or before the end exactly
when it was stored before the end, whichever replica's clock stamped either, so the OTLP root
span (read once the end is stored) carries it or a later evaluation span does, never both or
neither. On SQLite and PostgreSQL; two connections at once on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pg import PostgresServer

from gateway.exporters.otlp import rollout_ends, rollout_rewards
from store import writes
from store.backend import atomic, libpq_url
from store.errors import Conflict
from store.schema import connect

pytestmark = pytest.mark.both_backends

SECOND = 10**9


@pytest.fixture
def db(db_path: Any) -> Iterator[Any]:
    conn = connect(db_path)
    with atomic(conn):
        writes.create_rollout(conn, rollout_id="r1")
    yield conn
    conn.close()


def _clock(monkeypatch: pytest.MonkeyPatch, offset_ns: int) -> None:
    """This writer's clock, `offset_ns` off the others' (another replica's host)."""
    real = time.time_ns
    monkeypatch.setattr(writes.time, "time_ns", lambda: real() + offset_ns)


def _reward(db: Any, reward_id: str) -> dict[str, Any]:
    with atomic(db):
        return writes.add_reward(db, {"rollout_id": "r1", "value": 1.0, "id": reward_id})[0]


def _end(db: Any) -> dict[str, Any]:
    with atomic(db):
        return writes.update_rollout(db, "r1", status="succeeded")


def test_a_reward_given_after_the_end_by_a_clock_behind_is_after_the_end(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = _end(db)
    _clock(monkeypatch, -5 * SECOND)
    late = _reward(db, "rw-late")
    assert late["created_ns"] > ended["ended_ns"]
    assert rollout_rewards(db, "r1", ended["ended_ns"]) == []


def test_an_end_after_a_reward_from_a_clock_ahead_is_not_before_it(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clock(monkeypatch, 5 * SECOND)
    early = _reward(db, "rw-early")
    monkeypatch.undo()
    ended = _end(db)
    assert ended["ended_ns"] >= early["created_ns"]
    # Still the change that ended it (what the exporter sends the root span for).
    assert ended["updated_ns"] == ended["ended_ns"]
    [carried] = rollout_rewards(db, "r1", ended["ended_ns"])
    assert carried["id"] == "rw-early"


def test_a_reward_and_an_end_written_at_once_on_two_connections_keep_their_commit_order(
    postgres: PostgresServer,
) -> None:
    """Two replicas on one PostgreSQL: the reward's transaction holds the rollout while the
    end waits for it, so the end is stamped after the reward commits and the root span read
    after the end carries it."""
    url = postgres.new_database()
    db, other = connect(url), connect(url)
    with atomic(db):
        writes.create_rollout(db, rollout_id="r1")
    ended: dict[str, Any] = {}
    with atomic(db):
        given = writes.add_reward(db, {"rollout_id": "r1", "value": 1.0, "id": "rw-at-once"})[0]
        ending = threading.Thread(target=lambda: ended.update(_end(other)))
        ending.start()
        _wait_for_lock_wait(url)
        assert not ended  # the end waits on the reward's lock
    ending.join(timeout=10)
    assert ended["ended_ns"] >= given["created_ns"]
    assert [r["id"] for r in rollout_rewards(db, "r1", ended["ended_ns"])] == ["rw-at-once"]
    assert rollout_ends(db, ["r1"]) == {"r1": ended["ended_ns"]}
    db.close()
    other.close()


def test_one_reward_id_posted_to_two_replicas_at_once_is_stored_once(
    postgres: PostgresServer,
) -> None:
    """A client retrying a reward with its id, the two tries reaching two replicas at once:
    the second waits for the first and answers as its repeat (not a unique-key error)."""
    url = postgres.new_database()
    db, other = connect(url), connect(url)
    with atomic(db):
        writes.create_rollout(db, rollout_id="r1")
    body = {"rollout_id": "r1", "value": 1.0, "id": "rw-retried"}
    second: list[tuple[dict[str, Any], bool]] = []
    with atomic(db):
        first, created = writes.add_reward(db, body)
        assert created
        retry = threading.Thread(target=lambda: second.append(writes.add_reward(other, body)))
        retry.start()
        _wait_for_lock_wait(url)
    retry.join(timeout=10)
    [(again, created_again)] = second
    assert (again["id"], again["created_ns"], created_again) == (
        "rw-retried",
        first["created_ns"],
        False,
    )
    with pytest.raises(Conflict):
        writes.add_reward(other, {**body, "value": 0.5})
    db.close()
    other.close()


def _wait_for_lock_wait(url: str) -> None:
    """Until some connection of the database waits on a row lock."""
    deadline = time.monotonic() + 10
    with psycopg.connect(libpq_url(url), autocommit=True) as watcher:
        while time.monotonic() < deadline:
            waiting = watcher.execute(
                "select count(*) from pg_stat_activity "
                "where datname = current_database() and wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.01)
    raise AssertionError("no connection waited on the rollout's lock")
