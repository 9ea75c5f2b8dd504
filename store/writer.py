"""The one thread that writes: spans arrive on a queue and are inserted in batches.

The request path only calls `put()` (a non-blocking queue put). When the writer is
behind by more than `queue_size` records, or the database refuses a write, records
go to the journal instead, and the journal is replayed once the database takes
writes again (and at every start).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from store.journal import Journal, journal_path_for, read_records
from store.schema import SPAN_COLUMNS, connect

log = logging.getLogger("spangate.writer")

T = TypeVar("T")

JSON_SPAN_COLUMNS = frozenset(
    {"finish_reasons", "tool_calls", "request_body", "response_body", "attributes", "tags"}
)
REPLAY_RETRY_SECONDS = 1.0
CHECKPOINT_SECONDS = 1.0

_INSERT_SPAN = (
    f"INSERT OR IGNORE INTO spans ({', '.join(SPAN_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in SPAN_COLUMNS)})"
)
_ENSURE_ROLLOUT = """
INSERT INTO rollouts (id, status, agent, metadata, tags, created_ns, updated_ns)
VALUES (?, 'running', ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET updated_ns = max(rollouts.updated_ns, excluded.updated_ns)
"""
_ENSURE_ATTEMPT = """
INSERT INTO attempts (rollout_id, id, number, status, created_ns, updated_ns)
VALUES (
    :rollout_id, :id,
    (SELECT coalesce(max(number), 0) + 1 FROM attempts WHERE rollout_id = :rollout_id),
    'running', :now, :now
)
ON CONFLICT (rollout_id, id) DO UPDATE SET updated_ns = max(attempts.updated_ns, excluded.updated_ns)
"""


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    kind = value.__class__
    if kind is bytes:
        return value.decode("utf-8", errors="replace")
    if kind is str:
        return _valid_utf8(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        # Lone surrogates (or other values orjson refuses): escaped rather than lost.
        return json.dumps(value, ensure_ascii=True, default=str)


def _valid_utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def normalize_span(record: dict[str, Any]) -> dict[str, Any]:
    """Make a span record plain JSON (bodies as text) so it can be journaled or inserted."""
    out = dict(record)
    for key in JSON_SPAN_COLUMNS:
        if key in out:
            out[key] = _json_text(out[key])
    for key in ("metadata",):
        if key in out and not isinstance(out[key], str | type(None)):
            out[key] = orjson.dumps(out[key]).decode()
    return out


_JSON_POSITIONS = tuple(i for i, col in enumerate(SPAN_COLUMNS) if col in JSON_SPAN_COLUMNS)


def _span_row(record: dict[str, Any]) -> list[Any]:
    # The hot loop of the writer: plain lookups, then the few JSON columns by position.
    get = record.get
    row = [get(col) for col in SPAN_COLUMNS]
    for position in _JSON_POSITIONS:
        if row[position] is not None:
            row[position] = _json_text(row[position])
    return row


def insert_spans(db_conn: sqlite3.Connection, records: list[dict[str, Any]]) -> None:
    """Insert spans and create their rollouts and attempts on first sight, in one transaction."""
    rollouts: dict[str, dict[str, Any]] = {}
    attempts: dict[tuple[str, str], int] = {}
    for record in records:
        rid = record.get("rollout_id")
        if not rid:
            continue
        end = record["end_ns"]
        seen = rollouts.get(rid)
        if seen is None:
            rollouts[rid] = {
                "start_ns": record["start_ns"],
                "end_ns": end,
                "agent": record.get("agent"),
                "metadata": record.get("metadata"),
                "tags": record.get("tags"),
            }
        else:
            seen["start_ns"] = min(seen["start_ns"], record["start_ns"])
            seen["end_ns"] = max(seen["end_ns"], end)
            for key in ("agent", "metadata", "tags"):
                seen[key] = seen[key] or record.get(key)
        aid = record.get("attempt_id")
        if aid:
            attempts[(rid, aid)] = max(attempts.get((rid, aid), 0), end)
    cur = db_conn.cursor()
    cur.execute("BEGIN")
    try:
        cur.executemany(
            _ENSURE_ROLLOUT,
            [
                (
                    rid,
                    info["agent"],
                    _json_text(info["metadata"]) or "{}",
                    _json_text(info["tags"]) or "[]",
                    info["start_ns"],
                    info["end_ns"],
                )
                for rid, info in rollouts.items()
            ],
        )
        cur.executemany(
            _ENSURE_ATTEMPT,
            [{"rollout_id": rid, "id": aid, "now": end} for (rid, aid), end in attempts.items()],
        )
        cur.executemany(_INSERT_SPAN, [_span_row(r) for r in records])
        cur.execute("COMMIT")
    except BaseException:
        if db_conn.in_transaction:
            cur.execute("ROLLBACK")
        raise


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


class StoreWriter:
    """Owns the only write connection; everything that writes goes through its queue."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        queue_size: int = 50_000,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        journal_path: str | Path | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.journal = Journal(journal_path or journal_path_for(db_path, os.getpid()))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: Any = None
        self.written = 0
        self.spilled = 0
        self.replayed = 0
        self.dropped = 0
        self.healthy = True
        self.last_error: str | None = None
        self._next_replay = 0.0
        self._commit_hooks: list[Callable[[], None]] = []
        self._urgent = threading.Event()
        self._stopped = threading.Event()
        self._checkpointer: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Open the database (running migrations), replay any journal, start the threads."""
        self._db = connect(self.db_path)
        # Checkpoints (copying the WAL into the database file, with an fsync) run on their
        # own thread and connection, so the writer never stops to do one.
        self._db.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.journal.claim_orphans(self.db_path)
        self._replay_journal()
        self._thread = threading.Thread(target=self._run, name="spangate-writer", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="spangate-checkpoint", daemon=True
        )
        self._checkpointer.start()

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
            return
        self._queue.put(_STOP)
        self._urgent.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("writer did not drain within %ss; the rest goes to the journal", timeout)
            self._spill_queue()
        self._thread = None
        self._stopped.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout)
            self._checkpointer = None
        self.journal.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- producers (any thread) -------------------------------------------

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, record: dict[str, Any]) -> None:
        """Queue a span for writing; never blocks. Past the bound it spills to the journal."""
        if self._queue.qsize() >= self.queue_size:
            self.journal.append([normalize_span(record)])
            self.spilled += 1
            return
        self._queue.put(record)

    def on_commit(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook()` on the writer thread after each batch is committed; returns an undo."""
        self._commit_hooks.append(hook)
        return lambda: self._commit_hooks.remove(hook)

    async def execute(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(db)` on the writer thread after everything queued before it; await it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Task(fn, loop, future))
        self._urgent.set()
        return await future

    # -- the thread -------------------------------------------------------

    def _run(self) -> None:
        """Wake every `flush_interval` (or at once for an awaited write or shutdown) and
        write everything queued, `batch_size` rows a transaction.

        The thread never blocks on the queue itself: a put would then wake it for every
        span and hand the GIL back and forth with the event loop on every call.
        """
        stopping = False
        while not stopping:
            self._urgent.wait(self.flush_interval)
            self._urgent.clear()
            while True:
                items = self._drain()
                if not items:
                    break
                stopping = self._process(items) or stopping
            self._notify()
            self._maybe_replay()

    def _drain(self) -> list[Any]:
        items: list[Any] = []
        while len(items) < self.batch_size:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _process(self, items: list[Any]) -> bool:
        """Write spans in order, running awaited writes where they stand; True on stop."""
        stopping = False
        spans: list[dict[str, Any]] = []
        for item in items:
            if item is _STOP:
                stopping = True
            elif isinstance(item, _Task):
                self._write_spans(spans)
                spans = []
                self._run_task(item)
            else:
                spans.append(item)
        self._write_spans(spans)
        return stopping

    def _notify(self) -> None:
        for hook in list(self._commit_hooks):
            try:
                hook()
            except Exception:
                log.exception("commit hook %r failed", hook)

    def _write_spans(self, spans: list[dict[str, Any]]) -> None:
        if not spans:
            return
        try:
            insert_spans(self._db.conn, spans)
        except sqlite3.Error as exc:
            self._mark_unhealthy(exc)
            self.journal.append([normalize_span(s) for s in spans])
            self.spilled += len(spans)
            return
        except Exception:
            # A record the store cannot take must not stop the thread (or cost the others).
            log.exception(
                "a batch of %d spans could not be written; writing one by one", len(spans)
            )
            self._write_one_by_one(spans)
            return
        self.written += len(spans)

    def _write_one_by_one(self, spans: list[dict[str, Any]]) -> None:
        for span in spans:
            try:
                insert_spans(self._db.conn, [normalize_span(span)])
                self.written += 1
            except Exception:
                self.dropped += 1
                log.exception("span %s could not be stored", span.get("span_id"))

    def _run_task(self, task: _Task) -> None:
        try:
            result, error = task.fn(self._db), None
        except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
            result, error = None, exc
        if isinstance(error, sqlite3.Error):
            self._mark_unhealthy(error)
        if not task.loop.is_closed():
            task.loop.call_soon_threadsafe(_resolve, task.future, result, error)

    def _mark_unhealthy(self, exc: BaseException) -> None:
        if self.healthy:
            log.error("database write failed (%s); spilling to %s", exc, self.journal.path)
        self.healthy = False
        self.last_error = str(exc)
        self._next_replay = time.monotonic() + REPLAY_RETRY_SECONDS

    def _maybe_replay(self) -> None:
        if time.monotonic() < self._next_replay:
            return
        if not self.healthy or self.journal.has_records():
            self._replay_journal()

    def _replay_journal(self) -> None:
        paths = self.journal.leftover_replays()
        taken = self.journal.take()
        if taken is not None:
            paths.append(taken)
        for path in paths:
            batch: list[dict[str, Any]] = []
            try:
                for record in read_records(path):
                    batch.append(record)
                    if len(batch) >= self.batch_size:
                        insert_spans(self._db.conn, batch)
                        self.replayed += len(batch)
                        batch = []
                if batch:
                    insert_spans(self._db.conn, batch)
                    self.replayed += len(batch)
            except sqlite3.Error as exc:
                # Inserts are idempotent (span_id is the key), so the whole file is kept
                # and replayed again later.
                self._mark_unhealthy(exc)
                return
            path.unlink()
        if paths:
            log.info("replayed journal: %d spans so far", self.replayed)
        self.healthy = True
        self.last_error = None

    def _spill_queue(self) -> None:
        rest: list[dict[str, Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                rest.append(normalize_span(item))
        if rest:
            self.journal.append(rest)
            self.spilled += len(rest)
