"""Store writers driven by hand in tests, and what they stored."""

from __future__ import annotations

import sqlite3
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
