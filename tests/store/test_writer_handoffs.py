"""Spans handed between the recorder's threads (the event loop, the writer, the guard, and
`close`) are never in no place at once: each test drives one interleaving to its end."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from shapes import span_record
from writers import close_past_a_stuck_guard, count, full, lines, opened, read_only

from gateway.compose import writer_for
from store import writer as writer_module
from store.records import journal_line
from store.writer import _STOP, StoreWriter, _Task


def test_held_spans_count_as_unsettled_while_they_are_stored(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = opened(db)
    writer._held.append(span_record("r1", 1))
    seen: list[tuple[bool, int]] = []
    insert = writer._insert_isolating

    def watched(records: list[dict[str, Any]]) -> int:
        seen.append((writer.settled, writer.held))
        return insert(records)

    writer._insert_isolating = watched  # type: ignore[method-assign]
    writer._retry_held()
    assert count(db) == 1
    assert seen == [(False, 1)]
    assert writer.settled


class Watched(deque):  # type: ignore[type-arg]
    """A queue that notes which thread looked at or took each entry, and can hold the
    guard between looking at the head and taking it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ops: list[tuple[str, str]] = []
        self.guard_looked = threading.Event()
        self.writer_ready = threading.Event()

    def __getitem__(self, i: Any) -> Any:
        who = threading.current_thread().name
        self.ops.append((who, "look"))
        if who == "guard" and not self.guard_looked.is_set():
            self.guard_looked.set()
            assert self.writer_ready.wait(10)
        return super().__getitem__(i)

    def popleft(self) -> Any:
        self.ops.append((threading.current_thread().name, "take"))
        return super().popleft()


def test_the_writer_takes_nothing_while_the_guard_is_taking(tmp_path: Path) -> None:
    # X waited too long (the guard's), Y did not, and T is a reward for Y. While the guard
    # looks at X and takes it, the writer waits; then it takes Y and T, and T finds Y.
    db = tmp_path / "s.db"
    writer = opened(db)
    x, y = span_record("r1", 1), span_record("r1", 2)
    now = time.monotonic()
    loop = asyncio.new_event_loop()
    found: list[int] = []

    def reward(db_: Any) -> None:
        row = db_.conn.execute("select count(*) from spans where span_id = ?", (y["span_id"],))
        found.append(row.fetchone()[0])

    queue = Watched([(now - 10, x), (now, y), (now, _Task(reward, loop, loop.create_future()))])
    writer._queue = queue

    def writing() -> None:
        assert queue.guard_looked.wait(10)
        queue.writer_ready.set()
        writer._process(writer._drain())

    threads = [
        threading.Thread(target=writer._spill_old, args=(now - 5,), name="guard"),
        threading.Thread(target=writing, name="writer"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    loop.close()
    takers = [who for who, op in queue.ops if op == "take"]
    assert takers == ["guard", "writer", "writer"]
    assert found == [1]
    assert count(db) == 2 and not queue


@pytest.mark.asyncio
async def test_a_writer_that_outlives_a_timed_out_close_keeps_every_span(
    tmp_path: Path,
) -> None:
    # close(timeout) gives up while the writer is in a long awaited write. The writer, once
    # free, must neither lose the spans close journaled nor take them for refused ones.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=0.05)
    writer.start()
    held, release = threading.Event(), threading.Event()

    def hold(_db: Any) -> None:
        held.set()
        release.wait(10)

    blocker = asyncio.ensure_future(writer.execute(hold))
    await asyncio.to_thread(held.wait, 10)
    for seq in range(1, 4):
        writer.put(span_record("r1", seq))
    thread = writer._thread
    assert thread is not None
    await asyncio.to_thread(writer.close, 0.2)
    assert writer.spilled == 3
    release.set()
    await blocker
    # The stop marker stays queued: the writer ends once it is free.
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert writer.quarantined == 0
    journaled = writer.journal.has_records() or writer.journal.replay_files()
    assert count(db) + (3 if journaled else 0) == 3


def guard_held_in_a_kept_write(db: Path) -> tuple[StoreWriter, threading.Event, threading.Event]:
    """A started writer whose guard, once a span has waited, stops inside its kept-file write
    (`in_write` set) until `go` is set."""
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=0.2)
    in_write, go = threading.Event(), threading.Event()
    write_kept = writer.journal.write_kept

    def slow_write_kept(lines: list[bytes]) -> Path:
        in_write.set()
        assert go.wait(10)
        return write_kept(lines)

    writer.journal.write_kept = slow_write_kept  # type: ignore[method-assign]
    writer.start()
    return writer, in_write, go


def test_close_stores_a_batch_the_guard_kept_after_the_writer_last_looked(
    tmp_path: Path,
) -> None:
    # The guard is writing a kept file when close() starts; the writer drains and exits
    # before the guard hands the batch over. close() stores it, not the next start.
    db = tmp_path / "s.db"
    writer, in_write, go = guard_held_in_a_kept_write(db)
    thread = writer._thread
    assert thread is not None
    writer.put(span_record("r1", 1))
    assert in_write.wait(10)
    closing = threading.Thread(target=writer.close, args=(10,))
    closing.start()
    thread.join(10)  # the writer has made its last pass
    go.set()
    closing.join(10)
    assert count(db) == 1
    assert list(tmp_path.glob("s.db.spill*")) == []


def test_close_keeps_the_stop_for_a_writer_still_running(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = opened(db)
    writer.put(span_record("r1", 1))
    writer._queue.append((time.monotonic(), _STOP))
    writer._spill_queue()
    writer.journal.close()
    writer._db.close()
    assert [item for _, item in writer._queue] == [_STOP]
    assert writer.spilled == 1


def test_a_batch_kept_after_close_gave_up_on_the_guard_is_not_left_behind(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    writer, in_write, go = guard_held_in_a_kept_write(db)
    guard = writer._guard
    assert guard is not None
    writer.put(span_record("r1", 1))
    assert in_write.wait(10)
    writer.close(timeout=0.3)  # the writer stops at once; the guard join times out
    go.set()
    guard.join(10)
    assert not guard.is_alive()
    # Another writer of this process on the same store (the CLI opens one per command).
    later = writer_for(db)
    later.start()
    later.close(timeout=10)
    assert (count(db), writer.depth) == (1, 0)
    assert sorted(p.name for p in tmp_path.glob("s.db.spill*")) == []


def test_kept_counts_only_spans_stored_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "s.db"
    writer = opened(db)
    good, bad = span_record("r1", 1), span_record("r1", 2, name="refused")
    insert = writer_module.insert_spans

    def refusing(db_: Any, spans: list[dict[str, Any]]) -> None:
        if any(s["name"] == "refused" for s in spans):
            raise sqlite3.IntegrityError("refused")  # this batch's contents, not the store
        insert(db_, spans)

    monkeypatch.setattr(writer_module, "insert_spans", refusing)
    records = [good, bad]
    path = writer.journal.write_kept([journal_line(r) for r in records])
    writer._kept.append((path, records))
    writer._kept_spans += len(records)
    writer._save_kept()
    assert (count(db), writer.quarantined, writer.written) == (1, 1, 1)
    assert writer.kept == 1


def test_spans_neither_the_store_nor_the_journal_took_are_counted_lost_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk under both: the spans were held in memory, and the process is stopping.
    def failing(*_: Any, **__: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(writer_module, "insert_spans", failing)
    writer = writer_for(tmp_path / "s.db")
    writer.start()

    writer.journal.append = full  # type: ignore[method-assign]
    writer.put(span_record("r1", 1))
    writer.put(span_record("r1", 2))
    writer.close(timeout=10)
    assert (writer.lost, writer.held) == (2, 0)


def test_release_kept_does_not_drive_depth_negative_under_a_stuck_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer has popped a kept batch and is inside its insert when close() gives up
    # on it; _release_kept now sets _kept_spans = 0, and the writer's own decrement
    # afterwards takes it below zero.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=60.0)
    writer.start()
    in_insert, go = threading.Event(), threading.Event()
    insert = writer_module.insert_spans

    def slow(db_: Any, spans: list[dict[str, Any]]) -> None:
        if any(s["name"] == "slow" for s in spans):
            in_insert.set()
            assert go.wait(10)
        insert(db_, spans)

    monkeypatch.setattr(writer_module, "insert_spans", slow)
    record = span_record("r1", 1, name="slow")
    path = writer.journal.write_kept([journal_line(record)])
    with writer._kept_lock:
        writer._kept.append((path, [record]))
        writer._kept_spans += 1
    writer._urgent.set()
    assert in_insert.wait(10)
    thread = writer._thread
    assert thread is not None
    writer.close(timeout=0.2)  # stuck: the writer keeps its batch
    go.set()
    thread.join(10)
    assert not thread.is_alive()
    writer._db.close()
    assert count(db) == 1
    assert writer.depth == 0


def test_spans_still_in_a_kept_file_are_not_counted_lost_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Store down and the folder read-only (EROFS): the kept file can neither be renamed
    # into the replay nor copied into the journal, so it stays on disk (a restart claims
    # it) and its spans are also held in memory; _last_pass counts them lost.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=60.0)
    writer.start()

    def down(*_: Any, **__: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    record = span_record("r1", 1)
    path = writer.journal.write_kept([journal_line(record)])
    monkeypatch.setattr(writer_module, "insert_spans", down)
    writer.journal.release = read_only  # type: ignore[method-assign]
    writer.journal.append = read_only  # type: ignore[method-assign]
    with writer._kept_lock:
        writer._kept.append((path, [record]))
        writer._kept_spans += 1
    writer.close(timeout=10)
    assert path.read_bytes() == lines(record)  # the span is safe on disk
    assert writer.lost == 0


def test_held_spans_of_a_kept_file_lose_their_mark_once_stored(tmp_path: Path) -> None:
    # The mark (their kept file stays on disk) must not outlive them: a new record could
    # take a freed one's id, and a real loss at close would go uncounted.
    db = tmp_path / "s.db"
    writer = opened(db)
    writer.journal.release = read_only  # type: ignore[method-assign]
    real_append = writer.journal.append
    for batch in range(3):
        records = [span_record("r1", batch * 10 + n) for n in range(1, 11)]
        path = tmp_path / f"kept{batch}"
        path.write_bytes(b"")
        writer.journal.append = read_only  # type: ignore[method-assign]
        writer._release(path, records)
        writer.journal.append = real_append  # type: ignore[method-assign]
        writer._retry_held()  # stored
    writer._db.close()
    assert (writer.held, count(db)) == (0, 30)
    assert len(writer._in_kept_file) == 0, f"{len(writer._in_kept_file)} ids of stored spans"


def test_a_kept_batch_past_the_memory_buffer_is_not_counted_lost(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    writer = opened(db, memory_buffer=1)
    records = [span_record("r1", 1), span_record("r1", 2)]
    path = writer.journal.write_kept([journal_line(r) for r in records])
    writer.journal.release = read_only  # type: ignore[method-assign]
    writer.journal.append = read_only  # type: ignore[method-assign]
    writer._release(path, records)
    writer._db.close()
    assert path.exists()  # both spans are on disk; a restart replays them
    assert writer.lost == 0


def test_a_guard_close_gave_up_on_does_not_stop_it_storing_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer stops normally and the store is healthy; the guard is stuck in a kept-file
    # write on a slow journal volume whose appends fail. A span spilled at close is held in
    # memory, and close stores it.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=0.2)
    writer.start()
    in_keep, go = threading.Event(), threading.Event()
    write_kept = writer.journal.write_kept

    def slow_keep(lines: list[bytes]) -> Path:
        in_keep.set()
        assert go.wait(30)
        return write_kept(lines)

    writer.journal.write_kept = slow_keep  # type: ignore[method-assign]
    late = span_record("r1", 2)
    put_late = threading.Event()

    def hook() -> None:
        # After the writer's last drain: left in the queue for close's _spill_queue.
        if writer._stopping.is_set() and not put_late.is_set():
            put_late.set()
            writer.put(late)

    writer.on_commit(hook)
    writer.put(span_record("r1", 1))
    assert in_keep.wait(10)  # the guard took the span and is stuck writing it
    writer.journal.append = read_only  # type: ignore[method-assign]
    close_past_a_stuck_guard(writer, go, 0.5)
    assert put_late.is_set()
    stored = count(db, f"select count(*) from spans where span_id = '{late['span_id']}'")
    assert (stored, writer.lost) == (1, 0)
