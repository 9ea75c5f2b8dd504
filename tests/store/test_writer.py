"""The batch writer: batches, spills past its bound, replays the journal, never loses a span."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from servers import wait_until
from shapes import span_record
from writers import count

from gateway.compose import writer_for
from store.journal import Journal, journal_path_for
from store.records import journal_line


def span(rollout: str | None = "r1", seq: int | None = 1, **extra: Any) -> dict[str, Any]:
    return span_record(rollout, seq, **extra)


def test_spans_are_written_with_their_rollout_and_attempt(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = writer_for(db)
    writer.start()
    for seq in range(1, 11):
        writer.put(span(seq=seq))
    writer.close(timeout=10)
    assert count(db) == 10
    assert count(db, "select count(*) from rollouts where id = 'r1'") == 1
    assert count(db, "select number from attempts where rollout_id = 'r1' and id = '1'") == 1


def test_past_the_queue_bound_spans_spill_and_replay_on_next_start(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = writer_for(db, queue_size=3)
    # Not started: nothing drains the queue, as when the writer falls far behind.
    for seq in range(1, 11):
        writer.put(span(seq=seq))
    assert writer.spilled == 7
    assert writer.journal.path.exists()
    writer.start()  # replays the journal, then drains the 3 queued
    writer.close(timeout=10)
    assert count(db) == 10
    assert not writer.journal.path.exists()


def test_a_torn_last_journal_line_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    first = writer_for(db, queue_size=1)
    for seq in range(1, 4):
        first.put(span(seq=seq))
    first.journal.close()
    with open(first.journal.path, "ab") as f:
        f.write(b'{"span_id": "torn')  # killed mid-write
    second = writer_for(db)
    second.start()
    second.close(timeout=10)
    assert count(db) == 2  # the queued one was never written (process "died"), 2 journaled


def test_replaying_the_same_journal_twice_does_not_duplicate(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = writer_for(db, queue_size=1)
    records = [span(seq=seq) for seq in range(1, 5)]
    for record in records:
        writer.put(record)
    writer.journal.close()
    copy = writer.journal.path.read_bytes()
    writer.start()
    writer.close(timeout=10)
    # As if a process that has since died had left the same records behind.
    journal_path_for(db).write_bytes(copy)
    again = writer_for(db)
    again.start()
    again.close(timeout=10)
    assert count(db) == 4


def test_a_live_process_journal_is_left_alone_and_a_dead_ones_is_replayed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    donor = writer_for(db, queue_size=1)
    for seq in range(1, 4):
        donor.put(span(seq=seq))
    donor.journal.close()
    records = donor.journal.path.read_bytes()
    live = journal_path_for(db, os.getppid())  # our parent is alive
    dead = journal_path_for(db, 2**22 + 12345)  # above pid_max: no such process
    live.write_bytes(records)
    dead.write_bytes(records)
    donor.journal.path.unlink()
    writer = writer_for(db)
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 2
    assert live.exists()
    assert not dead.exists()


def test_a_call_cancelled_before_it_was_numbered_keeps_the_store_healthy(tmp_path: Path) -> None:
    # A client that leaves before its call is numbered leaves a rollout span without a seq;
    # committing it beside another rollout's numbered span once spilled the whole batch
    # and called the store unwritable.
    db = tmp_path / "s.db"
    writer = writer_for(db)
    writer.start()
    writer.put(span("numbered", seq=1))
    writer.put(span("cancelled", seq=None, status="cancelled", http_status=499))
    writer.close(timeout=10)
    assert writer.healthy and writer.spilled == 0
    assert count(db) == 2


@pytest.mark.asyncio
async def test_depth_counts_the_batch_being_written_until_it_is_stored(tmp_path: Path) -> None:
    # What `/health/ready` reports as queue_depth: a reader that waits for 0 must then find
    # every span in the store, including those of a batch the writer has taken but not stored.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0)
    writer.start()
    held, release = threading.Event(), threading.Event()

    def hold(_db: Any) -> None:
        held.set()
        release.wait(10)

    def depth_mid_batch(_db: Any) -> tuple[int, int]:
        return writer.depth, count(db)

    try:
        blocker = asyncio.ensure_future(writer.execute(hold))
        await asyncio.to_thread(held.wait, 10)
        # The writer is busy: the probe and the five spans behind it form its next batch.
        probe = asyncio.ensure_future(writer.execute(depth_mid_batch))
        await asyncio.sleep(0)
        for seq in range(1, 6):
            writer.put(span(seq=seq))
        assert writer.depth == 7  # the blocking write, the probe, five spans
        release.set()
        await blocker
        depth, stored = await probe
        assert (depth, stored) == (6, 0)  # off the queue, none stored yet: still counted
        wait_until(lambda: writer.depth == 0, what="the writer to store the batch")
        assert count(db) == 5
    finally:
        release.set()
        writer.close(timeout=10)


async def _hold_writer(writer: Any, release: threading.Event) -> asyncio.Future[None]:
    """Keep the writer thread busy in an awaited write until `release` is set, as a writer
    far behind a burst is; the write's future, once the thread is in it."""
    held = threading.Event()

    def hold(_db: Any) -> None:
        held.set()
        release.wait(10)

    blocker = asyncio.ensure_future(writer.execute(hold))
    await asyncio.to_thread(held.wait, 10)
    return blocker


@pytest.mark.asyncio
async def test_spans_the_guard_journals_are_stored_from_memory_and_their_file_removed(
    tmp_path: Path,
) -> None:
    # A burst the writer cannot keep up with: what waits past half of max_unsaved_seconds is
    # journaled (so a kill keeps it), yet stored from memory, not read back from disk.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=0.2)
    writer.start()
    release = threading.Event()
    try:
        blocker = await _hold_writer(writer, release)
        body = '{"text":"été"}'
        sent = [span(seq=seq, request_body=body.encode()) for seq in range(1, 6)]
        for record in sent:
            writer.put(record)
        wait_until(
            lambda: list(tmp_path.glob("s.db.spill*.kept*")),
            what="the guard to journal the waiting spans",
        )
        kept = list(tmp_path.glob("s.db.spill*"))
        assert len(kept) == 1 and ".kept" in kept[0].name, kept
        assert len(kept[0].read_bytes().splitlines()) == 5  # on disk while the writer is busy
        assert writer.depth == 6  # the five kept spans and the blocking write
        assert not writer.settled
        release.set()
        await blocker
        wait_until(lambda: writer.depth == 0, what="the writer to store the kept spans")
        assert count(db) == 5
        # Stored from memory, and counted once: written, not spilled and replayed.
        assert (writer.written, writer.spilled, writer.replayed) == (5, 0, 0)
        assert writer.kept == 5
        assert not list(tmp_path.glob("s.db.spill*"))
        assert writer.settled
    finally:
        release.set()
        writer.close(timeout=10)
    conn = sqlite3.connect(db)
    try:
        bodies = conn.execute("select request_body from spans order by seq").fetchall()
    finally:
        conn.close()
    assert bodies == [('{"text":"été"}',)] * 5


def test_a_dead_process_kept_journal_is_claimed_and_replayed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    dead = Journal(journal_path_for(db, 2**22 + 12345))  # above pid_max: no such process
    records = [span(seq=seq) for seq in range(1, 4)]
    kept = dead.write_kept([journal_line(record) for record in records])
    writer = writer_for(db)
    writer.start()
    writer.close(timeout=10)
    assert count(db) == 3
    assert writer.replayed == 3
    assert not kept.exists()
    assert not list(tmp_path.glob("s.db.spill*"))


@pytest.mark.asyncio
async def test_the_guard_journals_a_backlog_a_batch_at_a_time(tmp_path: Path) -> None:
    # Taken whole, a backlog of 100,000 spans was encoded for seconds before any of it reached
    # the disk, and a kill meanwhile lost it all; a batch at a time, each is on disk at once.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=0.2, batch_size=10)
    writer.start()
    release = threading.Event()
    try:
        blocker = await _hold_writer(writer, release)
        for seq in range(1, 46):
            writer.put(span(seq=seq))
        wait_until(
            lambda: len(list(tmp_path.glob("s.db.spill*.kept*"))) == 5,
            what="the guard to journal the backlog",
        )
        files = sorted(tmp_path.glob("s.db.spill*.kept*"))
        assert [len(f.read_bytes().splitlines()) for f in files] == [10, 10, 10, 10, 5]
        release.set()
        await blocker
        wait_until(lambda: writer.depth == 0, what="the writer to store the backlog")
        assert count(db) == 45
        assert count(db, "select max(seq) from spans") == 45
        assert not list(tmp_path.glob("s.db.spill*"))
    finally:
        release.set()
        writer.close(timeout=10)
