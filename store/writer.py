"""The one thread that writes, and the guard that keeps it alive and the record safe.

The request path only calls `put()` (an append to a deque). The writer thread inserts in
batches. The guard thread restarts the writer if it ever dies, and moves records that
waited longer than half of `max_unsaved_seconds` to the journal, so a process kill loses at
most that window. A record the database refuses is isolated by bisection and quarantined
in the dead-letter file; when the journal cannot be written either (a full disk), records
are held in a bounded buffer in memory and everything recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from store.backend import atomic, dialect_of, store_label
from store.errors import NotFound, StoreBusy, StoreUnavailable
from store.journal import (
    BadLine,
    DeadLetters,
    Journal,
    dead_letter_path_for,
    journal_path_for,
    read_records,
)
from store.records import clean_span, journal_line
from store.schema import connect
from store.span_inserts import insert_spans

log = logging.getLogger("spangate.writer")

T = TypeVar("T")

REPLAY_RETRY_SECONDS = 1.0
# On PostgreSQL, replicas' writers take turns at one batch lock, so waits of a few hundred ms
# are normal there: a lock wait is bounded by `busy_timeout` but never below this.
PG_MIN_LOCK_WAIT_SECONDS = 2.0
# A transaction of this writer's that stalls (a paused VM, a lost network) is ended by the
# server after this long, so its locks do not stop every other replica's writer for good.
PG_IDLE_IN_TRANSACTION = "30s"
CHECKPOINT_SECONDS = 1.0
FAULT_PAUSE_SECONDS = 0.1


# PostgreSQL error classes that refuse what was written, not the store: data exceptions (22),
# integrity violations (23) and program limits (54: a value too big for an index entry, say,
# which psycopg raises as an OperationalError).
RECORD_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


def _store_failure(exc: BaseException) -> bool:
    """True when the store itself failed (locked, full, read-only, corrupt, unreachable),
    so no record would go in; False when this batch's contents were refused."""
    if isinstance(exc, StoreUnavailable):
        return True
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        if (exc.sqlstate or "")[:2] in RECORD_SQLSTATE_CLASSES:
            return False
        return not isinstance(exc, psycopg.DataError | psycopg.IntegrityError)
    return isinstance(exc, sqlite3.OperationalError) or (
        isinstance(exc, sqlite3.DatabaseError)
        and not isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError)
    )


@dataclass
class _Task:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_STOP = object()


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WriterTuning(Protocol):
    """What the writer is tuned by (config's recorder settings; store cannot import config)."""

    queue_size: int
    batch_size: int
    flush_interval: float
    max_unsaved_seconds: float
    memory_buffer: int
    busy_timeout: float
    journal_dir: str | None


class StoreWriter:
    """Owns the only write connection; everything that writes goes through its queue.

    Its tuning comes from `RecorderSettings` (config owns the defaults).
    """

    @classmethod
    def tuned(cls, db_path: str | Path, tuning: WriterTuning) -> StoreWriter:
        """A writer for `db_path` tuned by `tuning` (the `recorder` settings)."""
        return cls(
            db_path,
            queue_size=tuning.queue_size,
            batch_size=tuning.batch_size,
            flush_interval=tuning.flush_interval,
            max_unsaved_seconds=tuning.max_unsaved_seconds,
            memory_buffer=tuning.memory_buffer,
            busy_timeout=tuning.busy_timeout,
            journal_dir=tuning.journal_dir,
        )

    def __init__(
        self,
        db_path: str | Path,
        *,
        queue_size: int,
        batch_size: int,
        flush_interval: float,
        max_unsaved_seconds: float,
        memory_buffer: int,
        busy_timeout: float,
        journal_dir: str | Path | None,
    ) -> None:
        # What `--db` named (a path or a URL), and the local path standing for it.
        self.target = db_path
        self.db_path = store_label(db_path)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_unsaved_seconds = max_unsaved_seconds
        self.memory_buffer = memory_buffer
        self.busy_timeout = busy_timeout
        self.journal = Journal(journal_path_for(self.db_path, os.getpid(), journal_dir))
        self.dead_letters = DeadLetters(dead_letter_path_for(self.db_path, journal_dir))
        # (time queued, record or task); deque appends and pops are atomic across threads.
        # Takers (the writer, the guard, close) hold the lock, so the guard can look at the
        # head and take it in one step; `put` appends without it.
        self._queue: deque[tuple[float, Any]] = deque()
        self._take_lock = threading.Lock()
        # Taken off the queue by the writer and not yet stored: `depth` counts them, so a
        # reader that waits for depth 0 finds every span it sent in the store.
        self._writing = 0
        # Taken off the queue by the guard and not yet kept or journaled (counted the same way);
        # the lock is held meanwhile, so an awaited write can wait for them to be kept.
        self._guarding = 0
        self._guard_lock = threading.Lock()
        # Spans the guard journaled (a file per batch) and left here for the writer, which
        # stores them from memory and deletes the file: a burst is not read back from disk.
        self._kept: deque[tuple[Path, list[dict[str, Any]]]] = deque()
        self._kept_spans = 0
        self._kept_lock = threading.Lock()
        # Set once `close` has released what was kept: a batch the guard hands over later
        # (it outlived close's wait) joins the replay itself.
        self._kept_closed = False
        # Records neither in the database nor in the journal (the journal was not writable),
        # and how many of them the writer has taken out to try again (`held` counts both).
        self._held: deque[dict[str, Any]] = deque()
        self._held_lock = threading.Lock()
        self._retrying = 0
        # Held spans whose kept file could not join the replay: the file stays, and the next
        # start replays it, so they are not lost if this process ends holding them.
        # Keyed by id, holding the record itself so the id cannot be reused meanwhile; a
        # mark goes when its record leaves `_held`.
        self._in_kept_file: dict[int, dict[str, Any]] = {}
        self._held_closed = False
        # Kept files that could not join the replay (a full disk): tried again once the
        # journal takes writes, and `settled` is false until then.
        self._stayed: list[Path] = []
        # Journal files whose rollouts' numbers are in `_unsaved` already.
        self._remembered: set[Path] = set()
        # Highest seq per rollout not yet committed: a sequencer that forgot a rollout
        # must not hand out a number the store does not show yet.
        self._unsaved: dict[str, int] = {}
        self._unsaved_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._guard: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._db: Any = None
        self.dialect = "sqlite"
        self.written = 0
        self.spilled = 0
        # Journaled by the guard in a burst and stored from memory (counted as written too).
        self.kept = 0
        self.replayed = 0
        self.lost = 0
        self.faults = 0
        self.restarts = 0
        self.healthy = True
        self.last_error: str | None = None
        self.journal_error: str | None = None
        self.last_fault: str | None = None
        self._next_replay = 0.0
        self._commit_hooks: list[Callable[[], None]] = []
        self._urgent = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Open the database (running migrations), replay any journal, start the threads."""
        self._db = connect(self.target)
        self.dialect = dialect_of(self._db)
        if self.dialect == "sqlite":
            self._db.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Checkpoints (copying the WAL into the database file, with an fsync) run on
            # their own thread and connection, so the writer never stops to do one.
            self._db.conn.execute("PRAGMA wal_autocheckpoint = 0")
        else:
            wait = max(self.busy_timeout, PG_MIN_LOCK_WAIT_SECONDS)
            self._db.set_session(
                lock_timeout=f"{int(wait * 1000)}ms",
                idle_in_transaction_session_timeout=PG_IDLE_IN_TRANSACTION,
            )
        self.journal.claim_orphans(self.db_path)
        self._replay_journal()
        self._start_writer()
        self._guard = threading.Thread(target=self._guard_loop, name="spangate-guard", daemon=True)
        self._guard.start()
        if self.dialect == "sqlite":
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="spangate-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spangate-writer", daemon=True)
        self._thread.start()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(str(self.db_path), check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            while not self._stopped.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then stop. Whatever cannot be written stays journaled."""
        if self._thread is None:
            self.journal.close()
            return
        self._stopping.set()
        self._queue.append((time.monotonic(), _STOP))
        self._urgent.set()
        self._thread.join(timeout)
        stuck = self._thread.is_alive()
        if stuck:
            log.error("writer did not drain within %ss; the rest goes to the journal", timeout)
        self._spill_queue()
        self._spill_held()
        self._thread = None
        self._stopped.set()
        guard_stuck = False
        if self._guard is not None:
            self._guard.join(timeout)
            guard_stuck = self._guard.is_alive()
        if not stuck:
            self._last_pass()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
        self._guard = self._checkpointer = None
        self._release_kept()
        if not (stuck or guard_stuck):
            # Still open for a thread that outlived the wait: it may yet append.
            self.journal.close()
        if self._db is not None and not stuck:
            # A writer still in a long write keeps its connection: closed under it, every
            # record it then tried would look refused and go to the dead-letter file.
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None

    def _last_pass(self) -> None:
        """Once the writer has stopped (and the guard, unless close gave up on it): what the
        guard kept or journaled after the writer's last look goes into the store now, not at
        the next start. What neither the store nor the journal took dies with the process:
        counted, said."""
        try:
            self._save_kept()
            if self.healthy and (self.journal.has_records() or self._held):
                self._retry_held()
                self._replay_journal()
        except Exception:
            log.exception("the writer's last pass at close failed; the journal keeps the rest")
        with self._held_lock:
            gone = sum(1 for record in self._held if id(record) not in self._in_kept_file)
            self._held.clear()
            self._in_kept_file.clear()
            self._held_closed = True
        if gone:
            self.lost += gone
            log.error("%d spans neither the store nor the journal took are lost at close", gone)

    # -- what readiness and metrics report ----------------------------------

    @property
    def depth(self) -> int:
        """Spans (and awaited writes) not yet stored: queued, kept after the guard journaled
        them, or in the batch being written."""
        # Read in the order spans move (queue, then the writer's or the guard's hands, then
        # kept): one moving between two reads is counted twice, never missed.
        return len(self._queue) + self._writing + self._guarding + self._kept_spans

    @property
    def held(self) -> int:
        # Under the lock: a retry that fails puts its spans back, and the two counts read
        # apart could then miss them both ways.
        with self._held_lock:
            return len(self._held) + self._retrying

    @property
    def quarantined(self) -> int:
        return self.dead_letters.count

    @property
    def settled(self) -> bool:
        """Nothing waits anywhere: queue, kept spans, the batch being written, memory buffer
        and journal are all empty."""
        return (
            self.depth == 0
            and not self.held
            and not self._stayed
            and not self.journal.has_records()
            and not self.journal.replay_files()
        )

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def problems(self) -> list[str]:
        """What keeps records from being safe right now, in words for `/health/ready`."""
        out = []
        if self._thread is not None and not self._thread.is_alive():
            out.append("writer thread is not running (the guard restarts it)")
        if not self.healthy:
            out.append(f"store not writable: {self.last_error}")
        if self.journal_error is not None:
            out.append(
                f"journal not writable ({self.journal_error}): holding {self.held} spans in "
                f"memory (at most {self.memory_buffer}; past that they are lost, "
                f"{self.lost} so far)"
            )
        return out

    def unsaved_seq(self, rollout_id: str) -> int:
        """The highest seq of this rollout not yet committed (0 when none)."""
        return self._unsaved.get(rollout_id, 0)

    # -- producers (any thread) -------------------------------------------

    def put(self, record: dict[str, Any]) -> None:
        """Queue a span for writing; never blocks or raises. Past the bound it spills."""
        rid = record.get("rollout_id")
        if rid:
            seq = record.get("seq")
            if seq.__class__ is int:
                with self._unsaved_lock:
                    if seq > self._unsaved.get(rid, 0):
                        self._unsaved[rid] = seq
        if len(self._queue) + self._kept_spans >= self.queue_size:
            self._spill([record])
            return
        self._queue.append((time.monotonic(), record))

    def on_commit(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook()` on the writer thread after each batch is committed; returns an undo."""
        self._commit_hooks.append(hook)
        return lambda: self._commit_hooks.remove(hook)

    async def execute(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(db)` on the writer thread after everything queued before it; await it."""
        if self._stopping.is_set() or self._thread is None:
            raise StoreBusy("the store writer is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((time.monotonic(), _Task(fn, loop, future)))
        self._urgent.set()
        return await future

    # -- the writer thread --------------------------------------------------

    def _run(self) -> None:
        """Wake every `flush_interval` (or at once for an awaited write or shutdown) and
        write everything queued, `batch_size` rows a transaction. No exception ends it.

        The thread never blocks on the queue itself: a put would then wake it for every
        span and hand the GIL back and forth with the event loop on every call.
        """
        while True:
            try:
                if self._cycle():
                    return
            except Exception as exc:
                # A bug or an unforeseen failure: counted, reported, and the loop goes on.
                self.faults += 1
                self.last_fault = f"{type(exc).__name__}: {exc}"
                log.exception("writer fault (the writer carries on)")
                time.sleep(FAULT_PAUSE_SECONDS)

    def _cycle(self) -> bool:
        self._urgent.wait(self.flush_interval)
        self._urgent.clear()
        stopping = False
        try:
            while True:
                self._save_kept()
                items = self._drain()
                if not items:
                    break
                stopping = self._process(items) or stopping
        finally:
            # The next drain recounts; this covers a batch that raised.
            self._writing = 0
        self._notify()
        self._retry_held()
        self._maybe_replay()
        return stopping

    def _drain(self) -> list[Any]:
        items: list[Any] = []
        queue = self._queue
        with self._take_lock:
            # Counted before they leave the queue, so no reader sees them in neither place.
            self._writing = wanted = min(len(queue), self.batch_size)
            for _ in range(wanted):
                items.append(queue.popleft()[1])
        return items

    def _process(self, items: list[Any]) -> bool:
        """Write spans in order, running awaited writes where they stand; True on stop."""
        stopping = False
        spans: list[dict[str, Any]] = []
        for item in items:
            if item is _STOP:
                stopping = True
            elif isinstance(item, _Task):
                self._save(spans)
                spans = []
                self._run_task(item)
            elif isinstance(item, dict):
                spans.append(item)
            else:
                self._quarantine(item, f"not a span record: {type(item).__name__}")
        self._save(spans)
        return stopping

    def _notify(self) -> None:
        for hook in list(self._commit_hooks):
            try:
                hook()
            except Exception:
                log.exception("commit hook %r failed", hook)

    def _save(self, spans: list[dict[str, Any]]) -> None:
        """Into the database if it takes writes, else into the journal; never raises."""
        if spans and self._stored(spans) is None:
            self._spill(spans)

    def _insert_isolating(self, spans: list[dict[str, Any]]) -> int:
        """Insert; when the contents are refused, bisect until the poison records are
        found and quarantined. Returns how many went in; store failures propagate (the
        caller spills)."""
        try:
            self._connected()
            insert_spans(self._db, spans)
        except Exception as exc:
            if _store_failure(exc):
                raise
            if len(spans) == 1:
                self._quarantine(spans[0], f"{type(exc).__name__}: {exc}")
                return 0
            log.warning("a batch of %d spans was refused (%s); isolating", len(spans), exc)
            middle = len(spans) // 2
            return self._insert_isolating(spans[:middle]) + self._insert_isolating(spans[middle:])
        self._committed(spans)
        return len(spans)

    def _committed(self, spans: Iterable[dict[str, Any]]) -> None:
        unsaved = self._unsaved
        if not unsaved:
            return
        with self._unsaved_lock:
            for span in spans:
                rid, seq = span.get("rollout_id"), span.get("seq")
                # A call cancelled before it was numbered has no seq: nothing to forget.
                if rid and seq is not None and unsaved.get(rid) == seq:
                    del unsaved[rid]

    def _quarantine(self, record: Any, reason: str) -> None:
        log.error("record quarantined in %s: %s", self.dead_letters.path, reason)
        try:
            kept = clean_span(record) if isinstance(record, dict) else record
        except Exception:
            kept = repr(record)
        if not self.dead_letters.add(kept, reason):
            self.lost += 1

    def _run_task(self, task: _Task) -> None:
        # Spans the journal holds come first, so a reward posted after its call finds it;
        # so do spans the guard is journaling right now (queued before this write).
        with self._guard_lock:
            self._save_kept()
        if not self.healthy or self._held or self.journal.has_records():
            self._retry_held()
            self._replay_journal()
        try:
            self._connected()
            if self.dialect == "postgresql":
                # Replicas share the store: a write that reads first must not be half done.
                with atomic(self._db):
                    result, error = task.fn(self._db), None
            else:
                result, error = task.fn(self._db), None
        except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
            result, error = None, exc
        if error is not None and _store_failure(error):
            self._mark_unhealthy(error)
            busy = StoreBusy(f"the store cannot take writes right now ({error})")
            busy.__cause__ = error
            error = busy
        elif isinstance(error, NotFound) and not self.healthy:
            # What it looked for may be in the journal, not yet written back.
            busy = StoreBusy(f"{error}; the store is catching up, try again shortly")
            busy.__cause__ = error
            error = busy
        if not task.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                task.loop.call_soon_threadsafe(_resolve, task.future, result, error)

    def _mark_unhealthy(self, exc: BaseException) -> None:
        if self.healthy:
            log.error("database write failed (%s); spilling to %s", exc, self.journal.path)
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._next_replay = time.monotonic() + REPLAY_RETRY_SECONDS

    # -- the journal and the memory buffer ------------------------------------

    def _spill(self, records: list[dict[str, Any]], *, on_disk: bool = False) -> bool:
        """To the journal; if it cannot be written, into the bounded memory buffer. False
        when they are only in memory now (`on_disk`: and in a kept file that stays)."""
        lines, journaled = self._journal_lines(records)
        if not lines:
            return True
        try:
            self.journal.append(lines)
        except Exception as exc:
            self._hold(journaled, exc, on_disk=on_disk)
            return False
        self._journaled(len(lines))
        return True

    def _journal_lines(
        self, records: list[dict[str, Any]]
    ) -> tuple[list[bytes], list[dict[str, Any]]]:
        """Each record as a journal line, and the records that have one (the rest are
        quarantined)."""
        lines, journaled = [], []
        for record in records:
            try:
                lines.append(journal_line(record))
            except Exception as exc:
                self._quarantine(record, f"cannot be journaled: {type(exc).__name__}: {exc}")
            else:
                journaled.append(record)
        return lines, journaled

    def _journaled(self, count: int) -> None:
        if self.journal_error is not None:
            log.warning("journal %s writable again", self.journal.path)
        self.journal_error = None
        self.spilled += count

    def _keep_journaled(self, records: list[dict[str, Any]]) -> None:
        """Journal spans that waited too long (a kill then keeps them) and leave them to the
        writer, which stores them from memory. While the store refuses writes, or past the
        queue's bound, they are spilled as any others and replayed later."""
        crowded = self._kept_spans + len(records) > self.queue_size
        if crowded or not self.healthy or self._stopping.is_set() or self._held:
            self._spill(records)
            return
        lines, journaled = self._journal_lines(records)
        if not lines:
            return
        try:
            path = self.journal.write_kept(lines)
        except OSError:
            self._spill(journaled)
            return
        # Counted as spilled only if they are ever replayed from the file (`_release`): each
        # span is counted once, as written or as spilled.
        self._journaled(0)
        with self._kept_lock:
            if not self._kept_closed:
                self._kept.append((path, journaled))
                self._kept_spans += len(journaled)
                return
        self._release(path, journaled)

    def _save_kept(self) -> None:
        """Store what the guard journaled and left here, then delete its file; while the
        store refuses writes the file joins the journal's replay instead."""
        while True:
            with self._kept_lock:
                if not self._kept:
                    return
                path, records = self._kept.popleft()
            try:
                stored = self._stored(records)
                if stored is None:
                    self._release(path, records)
                else:
                    self.kept += stored
                    with contextlib.suppress(OSError):
                        path.unlink()
            finally:
                with self._kept_lock:
                    self._kept_spans -= len(records)

    def _stored(self, records: list[dict[str, Any]]) -> int | None:
        """Into the database, unless it refuses writes (now, or still within the pause
        after a failure): how many went in (the rest were quarantined), None when the
        records are not in."""
        if not self.healthy and time.monotonic() < self._next_replay:
            return None
        try:
            stored = self._insert_isolating(records)
        except Exception as exc:
            self._mark_unhealthy(exc)
            return None
        self.written += stored
        return stored

    def _release(self, path: Path, records: list[dict[str, Any]]) -> None:
        try:
            self.journal.release(path)
        except OSError as exc:
            log.warning("kept journal %s cannot join the replay (%s); journaling again", path, exc)
            if self._spill(records, on_disk=True):
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                with self._kept_lock:
                    self._stayed.append(path)
            # Else the file stays, the one copy a kill keeps; a restart claims it, and the
            # spans stored from memory meanwhile are skipped then by their ids.
        else:
            self.spilled += len(records)

    def _release_stayed(self) -> bool:
        """Kept files a full disk kept out of the replay: in now, if the disk takes it.
        True when any joined."""
        if not self._stayed:
            return False
        with self._kept_lock:
            stayed = list(self._stayed)
        joined = False
        for path in stayed:
            try:
                self.journal.release(path)
            except FileNotFoundError:
                pass
            except OSError:
                break
            else:
                joined = True
            # Listed until its file is in the replay set, so `settled` never misses it.
            with self._kept_lock:
                self._stayed.remove(path)
        return joined

    def _release_kept(self) -> None:
        """At close: kept spans the writer did not store are replayed on the next start."""
        with self._kept_lock:
            self._kept_closed = True
            batches = list(self._kept)
            self._kept.clear()
            # Only these: a batch the writer is storing still counts until it is done.
            self._kept_spans -= sum(len(records) for _, records in batches)
        for path, records in batches:
            self._release(path, records)

    def _hold(
        self, records: list[dict[str, Any]], exc: BaseException, *, on_disk: bool = False
    ) -> None:
        if self.journal_error is None:
            log.error(
                "journal %s not writable (%s): holding up to %d spans in memory",
                self.journal.path,
                exc,
                self.memory_buffer,
            )
        self.journal_error = f"{type(exc).__name__}: {exc}"
        marks = self._in_kept_file
        with self._held_lock:
            # After close's last pass nothing takes held spans out again.
            room = 0 if self._held_closed else max(self.memory_buffer - len(self._held), 0)
            taken, dropped = records[:room], records[room:]
            self._held.extend(taken)
            if on_disk:
                marks.update((id(record), record) for record in taken)
            # Spans still in a kept file that stays are replayed by the next start: counted
            # as spilled now, as any span whose one copy is a journal file.
            safe = sum(1 for r in dropped if on_disk or marks.pop(id(r), None) is r)
        if safe:
            self.spilled += safe
            log.warning("memory buffer full: %d spans are only in their kept file", safe)
        if len(dropped) > safe:
            self.lost += len(dropped) - safe
            log.error("memory buffer full: %d spans lost", len(dropped) - safe)

    def _take_held(self) -> list[dict[str, Any]]:
        """Held records taken out, and counted in `held` until `_done_with_held`."""
        with self._held_lock:
            records = list(self._held)
            # Counted before they leave `_held`, so `held` never misses them.
            self._retrying += len(records)
            self._held.clear()
        return records

    def _done_with_held(self, records: list[dict[str, Any]]) -> None:
        with self._held_lock:
            self._retrying -= len(records)
            if self._in_kept_file:
                # Stored or journaled now, unless held again.
                still = {id(record) for record in self._held}
                for record in records:
                    if id(record) not in still:
                        self._in_kept_file.pop(id(record), None)

    def _retry_held(self) -> None:
        if not self._held:
            return
        records = self._take_held()
        try:
            if self.healthy:
                try:
                    self.written += self._insert_isolating(records)
                    return
                except Exception as exc:
                    self._mark_unhealthy(exc)
            self._spill(records)
        finally:
            self._done_with_held(records)

    def _spill_held(self) -> None:
        if self._held:
            records = self._take_held()
            try:
                self._spill(records)
            finally:
                self._done_with_held(records)

    def _maybe_replay(self) -> None:
        if time.monotonic() < self._next_replay:
            return
        if self._release_stayed() or not self.healthy or self.journal.has_records():
            self._replay_journal()

    def _replay_journal(self) -> None:
        """Write every journal file back; idempotent (span ids) and safe to interrupt: a
        file is removed only once all its records are in."""
        try:
            paths = self.journal.pending_files()
        except OSError as exc:
            log.error("journal files cannot be listed or moved: %s", exc)
            return
        for index, path in enumerate(paths):
            if not self._replay_file(path):
                # The files after it hold rollouts' numbers too (a backlog spans many files).
                for waiting in paths[index:]:
                    self._remember_unsaved(waiting)
                return
            path.unlink(missing_ok=True)
            self._remembered.discard(path)
        if paths:
            log.info("replayed journal: %d spans so far", self.replayed)
        elif not self.healthy and not self._takes_writes():
            return
        self.healthy = True
        self.last_error = None

    def _connected(self) -> None:
        """A PostgreSQL connection lost (server restarted) is opened again here; failing
        that raises `StoreUnavailable`, a store failure (records spill meanwhile)."""
        if self._db is None:
            raise StoreUnavailable("the store writer's connection is closed")
        if self.dialect == "postgresql" and self._db.broken:
            self._db.reconnect()

    def _takes_writes(self) -> bool:
        """Take the write lock and let it go: nothing written, but a lock held elsewhere
        shows (a store is not called healthy again just because nothing was pending)."""
        if self.dialect == "postgresql":
            try:
                self._connected()
                self._db.execute("select 1")
            except Exception as exc:
                self._mark_unhealthy(exc)
                return False
            return True
        conn = self._db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._mark_unhealthy(exc)
            return False
        return True

    def _replay_file(self, path: Path) -> bool:
        """True once every record of the file is in (or quarantined)."""
        batch: list[dict[str, Any]] = []
        try:
            for item in read_records(path):
                if isinstance(item, BadLine):
                    self._quarantine(
                        item.text.decode("utf-8", "replace"),
                        f"journal {path.name} line {item.number}: {item.reason}",
                    )
                    continue
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self.replayed += self._insert_isolating(batch)
                    batch = []
            if batch:
                self.replayed += self._insert_isolating(batch)
        except FileNotFoundError:
            return True  # replayed and removed by an earlier pass
        except Exception as exc:
            # The whole file is kept and replayed again later (inserts ignore span ids
            # already in); its rollouts' numbers stay known meanwhile.
            self._mark_unhealthy(exc)
            return False
        return True

    def _remember_unsaved(self, path: Path) -> None:
        """Note the numbers a journal file's spans hold, once per file: while the store
        refuses writes the replay is tried every second. Spans this process put are noted
        already (`put`); a file appended to later only gets such spans."""
        if path in self._remembered:
            return
        self._remembered.add(path)
        with contextlib.suppress(OSError):
            for item in read_records(path):
                if isinstance(item, dict):
                    rid, seq = item.get("rollout_id"), item.get("seq")
                    if isinstance(rid, str) and seq.__class__ is int:
                        with self._unsaved_lock:
                            if seq > self._unsaved.get(rid, 0):
                                self._unsaved[rid] = seq

    def _spill_queue(self) -> None:
        rest: list[dict[str, Any]] = []
        items: list[Any] = []
        with self._take_lock:
            # Popped one by one: `put` may append meanwhile, and nothing it adds is dropped.
            while True:
                try:
                    items.append(self._queue.popleft()[1])
                except IndexError:
                    break
            if any(item is _STOP for item in items):
                # A writer that outlived `close`'s wait still stops when it next looks.
                self._queue.append((time.monotonic(), _STOP))
        for item in items:
            if isinstance(item, dict):
                rest.append(item)
            elif isinstance(item, _Task):
                error = StoreBusy("the store writer stopped before this write ran")
                if not item.loop.is_closed():
                    with contextlib.suppress(RuntimeError):
                        item.loop.call_soon_threadsafe(_resolve, item.future, None, error)
        if rest:
            self._spill(rest)

    # -- the guard thread -------------------------------------------------------

    def _guard_loop(self) -> None:
        """Restart a dead writer; move records that waited too long to the journal."""
        tick = max(self.max_unsaved_seconds / 4, 0.01)
        age_limit = self.max_unsaved_seconds / 2
        while not self._stopped.wait(tick):
            try:
                if not self._stopping.is_set() and not self.alive:
                    self.restarts += 1
                    log.error("writer thread died; restarting it")
                    self._start_writer()
                self._spill_old(time.monotonic() - age_limit)
            except Exception:
                self.faults += 1
                log.exception("writer guard fault (the guard carries on)")

    def _spill_old(self, before: float) -> None:
        """Journal what was queued before `before`, a batch at a time: each batch is on disk
        within milliseconds, where a backlog taken whole would be encoded for seconds first
        and a kill meanwhile would lose all of it."""
        while True:
            with self._guard_lock:
                try:
                    old = self._take_old(before)
                    if not old:
                        return
                    self._keep_journaled(old)
                finally:
                    self._guarding = 0

    def _take_old(self, before: float) -> list[dict[str, Any]]:
        """Up to a batch of spans at the head of the queue, queued before `before`."""
        queue = self._queue
        old: list[dict[str, Any]] = []
        with self._take_lock:
            while queue and len(old) < self.batch_size:
                queued_at, item = queue[0]
                if queued_at >= before or not isinstance(item, dict):
                    break  # awaited writes keep their place in the order
                # Counted before it leaves the queue, so no reader sees it in neither place.
                self._guarding = len(old) + 1
                queue.popleft()
                old.append(item)
        return old
