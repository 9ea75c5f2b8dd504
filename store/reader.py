"""Reads off the event loop: a small thread pool, each thread with its own read-only connection."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from store.schema import connect

T = TypeVar("T")


class Reader:
    """Runs query functions on worker threads so the event loop never touches the store."""

    def __init__(self, db_path: str | Path, *, workers: int = 4) -> None:
        # A path or a `postgresql://` URL (which `Path` would mangle).
        self.db_path = db_path
        self._local = threading.local()
        self._connections: list[Database] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spangate-read")

    def _db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is not None and getattr(db, "broken", False):
            # A PostgreSQL connection lost with its server: opened again on the next read.
            db.reconnect()
        if db is None:
            db = connect(self.db_path, read_only=True)
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._db(), *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(db, *args)` on a read thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn, args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
