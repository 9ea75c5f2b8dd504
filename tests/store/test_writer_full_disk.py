"""A full disk under the recorder: spans held in memory, kept files that cannot join the
replay, and a close meanwhile. Each is counted as what it is (safe on disk, held, or lost)
and nothing reads as settled while a span waits unseen."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

from shapes import span_record
from writers import close_past_a_stuck_guard, count, full, opened, read_only

from gateway.compose import writer_for
from store.records import journal_line
from store.schema import connect
from store.writer import StoreWriter


def kept_file_that_stayed(db: Path, *, memory_buffer: int) -> tuple[StoreWriter, Path]:
    """A writer (no thread) whose kept batch of two could neither join the replay nor be
    journaled again (a read-only volume, since recovered): its file stays, and as many of
    its spans as fit are held in memory."""
    writer = opened(db, memory_buffer=memory_buffer)
    records = [span_record("r1", 1), span_record("r1", 2)]
    path = writer.journal.write_kept([journal_line(r) for r in records])
    writer.journal.release = read_only  # type: ignore[method-assign]
    writer.journal.append = read_only  # type: ignore[method-assign]
    writer._release(path, records)
    del writer.journal.release, writer.journal.append
    return writer, path


def test_a_kept_files_spans_dropped_when_a_failed_retry_holds_them_again_are_not_lost(
    tmp_path: Path,
) -> None:
    # Two spans held in memory whose kept file stayed on disk (marked). The writer retries
    # them while the store is down; its journal append fails, and meanwhile the event loop
    # spills two new spans that fill the memory buffer. The re-hold then drops the two
    # marked spans: they are still in their kept file (a restart replays them), so they
    # must not be counted lost; only the two new spans are at risk.
    db = tmp_path / "s.db"
    writer = opened(db, memory_buffer=2)
    marked = [span_record("r1", 1), span_record("r1", 2)]
    path = writer.journal.write_kept([journal_line(r) for r in marked])
    writer.journal.release = read_only  # type: ignore[method-assign]
    writer.journal.append = read_only  # type: ignore[method-assign]
    writer._release(path, marked)
    assert (writer.held, len(writer._in_kept_file), writer.lost) == (2, 2, 0)

    retrier_in_append, go = threading.Event(), threading.Event()
    retrier: list[threading.Thread] = []

    def append(_lines: list[bytes]) -> None:
        if threading.current_thread() in retrier:
            retrier_in_append.set()
            assert go.wait(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.journal.append = append  # type: ignore[method-assign]
    writer.healthy = False  # the store is down: the retry goes to the journal
    thread = threading.Thread(target=writer._retry_held)
    retrier.append(thread)
    thread.start()
    try:
        assert retrier_in_append.wait(10)
        writer._spill([span_record("r2", 1), span_record("r2", 2)])  # fills the buffer
    finally:
        go.set()
        thread.join(10)
    writer._db.close()
    assert path.exists()  # the marked spans are safe in their kept file
    assert writer.lost == 0, f"lost={writer.lost}: kept-file spans counted lost on re-hold"


def test_spans_a_stuck_guard_holds_after_close_are_counted_lost(
    tmp_path: Path,
) -> None:
    # The writer stops at once; the guard is stuck writing a kept file on a slow volume,
    # so close gives up on it and runs _last_pass without it. The kept write then fails
    # (the volume is full), the journal append too: the guard holds the span in memory of
    # a recorder that has stopped. Nothing will store it; it must be counted lost (and
    # said), as _last_pass does for what it finds held.
    db = tmp_path / "s.db"
    writer = writer_for(db, flush_interval=60.0, max_unsaved_seconds=0.2)
    writer.start()
    in_keep, go = threading.Event(), threading.Event()

    def stuck_keep(_lines: list[bytes]) -> Path:
        in_keep.set()
        assert go.wait(30)
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.journal.write_kept = stuck_keep  # type: ignore[method-assign]
    writer.put(span_record("r1", 1))
    assert in_keep.wait(10)  # the guard took the span and is stuck keeping it
    writer.journal.append = full  # type: ignore[method-assign]
    close_past_a_stuck_guard(writer, go, 0.3)
    assert count(db) == 0 and not list(tmp_path.glob("s.db.spill*"))  # nowhere on disk
    assert (writer.lost, writer.held) == (1, 0), (
        f"lost={writer.lost} held={writer.held}: a span only in a stopped recorder's memory"
    )


def test_spans_only_in_a_kept_file_that_stayed_do_not_read_as_settled(
    tmp_path: Path,
) -> None:
    # memory_buffer=1: a kept batch of two whose file cannot join the replay (read-only
    # rename) nor be journaled again: one span is held, the other only in the kept file
    # (no longer counted lost). The volume recovers; the held span is stored. The other is
    # in no count (`lost`, `held`, `depth`) and not in the store until a restart, yet the
    # recorder reads as settled.
    db = tmp_path / "s.db"
    writer, path = kept_file_that_stayed(db, memory_buffer=1)
    writer._retry_held()
    writer._replay_journal()
    stored = count(db)
    state = (writer.lost, writer.held, writer.depth, writer.settled)
    writer._db.close()
    assert path.exists()
    assert stored == 2 or not state[3], (
        f"stored={stored} (lost, held, depth, settled)={state}: a span waits unseen"
    )
    # The writer's next cycle brings the file into the replay, and the span into the store.
    writer._db = connect(writer.target)
    writer._maybe_replay()
    writer._db.close()
    assert (count(db), writer.settled, path.exists()) == (2, True, False)


def test_a_stayed_files_spans_stored_from_memory_are_not_counted_again_when_it_joins(
    tmp_path: Path,
) -> None:
    # A kept batch of two cannot join the replay nor be journaled again: both are held in
    # memory (marked), the file stays. The volume recovers: the writer's cycle stores the
    # held spans from memory (written=2), then `_maybe_replay` releases the stayed file and
    # adds its whole batch to `spilled`. Each span must be counted once, as written or as
    # spilled (the rule `_keep_journaled` states): 2, not 4.
    db = tmp_path / "s.db"
    writer, _ = kept_file_that_stayed(db, memory_buffer=100)
    assert (writer.held, writer.lost, len(writer._stayed)) == (2, 0, 1)
    # One writer cycle's tail, as `_cycle` runs it.
    writer._retry_held()
    writer._maybe_replay()
    stored = count(db)
    writer._db.close()
    assert stored == 2 and writer.settled
    assert writer.written + writer.spilled == 2, (
        f"written={writer.written} spilled={writer.spilled} for 2 spans: counted twice"
    )


def test_a_stayed_file_being_released_does_not_read_as_settled(tmp_path: Path) -> None:
    # memory_buffer=1: one span of the kept batch is held (and stored once the volume
    # recovers), the other is only in the kept file that stayed. While the writer thread
    # is in `_release_stayed` (it swapped `_stayed` for [] and is renaming the file), the
    # span is in no count and the file not yet in the replay set: `settled` must stay false.
    db = tmp_path / "s.db"
    writer, _ = kept_file_that_stayed(db, memory_buffer=1)
    release = writer.journal.release
    writer._retry_held()
    assert (count(db), writer.held, writer.depth, writer.settled) == (1, 0, 0, False)

    in_release, go = threading.Event(), threading.Event()

    def slow_release(kept: Path) -> None:
        in_release.set()
        assert go.wait(10)
        release(kept)

    writer.journal.release = slow_release  # type: ignore[method-assign]
    thread = threading.Thread(target=writer._release_stayed)
    thread.start()
    try:
        assert in_release.wait(10)
        seen = writer.settled
    finally:
        go.set()
        thread.join(10)
    writer._db.close()
    assert not thread.is_alive()
    assert not seen, "settled read true while a span was only in a stayed kept file"
