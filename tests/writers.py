"""Store writers driven by hand in tests, and what they stored."""

from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path
from typing import Any

from gateway.compose import writer_for
from store.records import journal_line
from store.schema import connect
from store.writer import StoreWriter


def count(db: Path, sql: str = "select count(*) from spans") -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def opened(db: Path, **tuning: Any) -> StoreWriter:
    """A writer with its connection open and no thread running: the test drives its steps."""
    writer = writer_for(db, **tuning)
    writer._db = connect(writer.target)
    return writer


def lines(*records: dict[str, Any]) -> bytes:
    """Records as a journal file holds them, one line each."""
    return b"".join(journal_line(record) + b"\n" for record in records)


def read_only(*_: Any, **__: Any) -> None:
    """Stands for a journal operation on a read-only volume."""
    raise OSError(errno.EROFS, "Read-only file system")


def full(*_: Any, **__: Any) -> Any:
    """Stands for a journal operation on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


def close_past_a_stuck_guard(writer: StoreWriter, go: threading.Event, timeout: float) -> None:
    """`close` while the guard is held until `go`; then the guard is let go and ends."""
    guard = writer._guard
    assert guard is not None
    try:
        writer.close(timeout=timeout)
    finally:
        go.set()
        guard.join(10)
        if writer._db is not None:
            writer._db.close()
    assert not guard.is_alive()
