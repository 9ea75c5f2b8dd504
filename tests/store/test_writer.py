"""The batch writer: batches, spills past its bound, replays the journal, never loses a span."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

from store.journal import journal_path_for
from store.writer import StoreWriter


def span(rollout: str | None = "r1", seq: int | None = 1, **extra: Any) -> dict[str, Any]:
    start = 1_700_000_000_000_000_000 + (seq or 0) * 1_000_000
    record: dict[str, Any] = {
        "span_id": uuid.uuid4().hex[:16],
        "trace_id": uuid.uuid4().hex,
        "rollout_id": rollout,
        "attempt_id": "1" if rollout else None,
        "seq": seq,
        "name": "chat gpt-test",
        "operation": "chat",
        "status": "ok",
        "stream": 0,
        "start_ns": start,
        "end_ns": start + 5_000_000,
        "duration_ms": 5.0,
        "retries": 0,
        "request_body": b'{"model":"gpt-test"}',
        "response_body": {"id": "chatcmpl-1", "choices": []},
        "attributes": {"gen_ai.request.temperature": 0.2},
        "tags": ["a"],
    }
    record.update(extra)
    return record


def count(db: Path, sql: str = "select count(*) from spans") -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_spans_are_written_with_their_rollout_and_attempt(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = StoreWriter(db)
    writer.start()
    for seq in range(1, 11):
        writer.put(span(seq=seq))
    writer.close(timeout=10)
    assert count(db) == 10
    assert count(db, "select count(*) from rollouts where id = 'r1'") == 1
    assert count(db, "select number from attempts where rollout_id = 'r1' and id = '1'") == 1


def test_past_the_queue_bound_spans_spill_and_replay_on_next_start(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = StoreWriter(db, queue_size=3)
    # Not started: nothing drains the queue, as when the writer falls far behind.
    for seq in range(1, 11):
        writer.put(span(seq=seq))
    assert writer.spilled == 7
    assert journal_path_for(db).exists()
    writer.start()  # replays the journal, then drains the 3 queued
    writer.close(timeout=10)
    assert count(db) == 10
    assert not journal_path_for(db).exists()


def test_a_torn_last_journal_line_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    first = StoreWriter(db, queue_size=1)
    for seq in range(1, 4):
        first.put(span(seq=seq))
    first.journal.close()
    with open(journal_path_for(db), "ab") as f:
        f.write(b'{"span_id": "torn')  # killed mid-write
    second = StoreWriter(db)
    second.start()
    second.close(timeout=10)
    assert count(db) == 2  # the queued one was never written (process "died"), 2 journaled


def test_replaying_the_same_journal_twice_does_not_duplicate(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = StoreWriter(db, queue_size=1)
    records = [span(seq=seq) for seq in range(1, 5)]
    for record in records:
        writer.put(record)
    writer.journal.close()
    copy = journal_path_for(db).read_bytes()
    writer.start()
    writer.close(timeout=10)
    journal_path_for(db).write_bytes(copy)
    again = StoreWriter(db)
    again.start()
    again.close(timeout=10)
    assert count(db) == 4
