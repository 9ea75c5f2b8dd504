"""How the store is opened and migrated: a SQLite file or a PostgreSQL URL, one schema
(`store/tables.py`) and one Alembic history (`store/migrations/`) for both."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from store.backend import PgDatabase, is_postgres, libpq_url

ROLLOUT_STATUSES = ("running", "succeeded", "failed", "cancelled", "timeout")
# The spans the `spans_trace` index holds (a partial index): those with a parent.
TRACE_INDEX = "spans_trace"
TRACED_SPANS = "parent_span_id is not null"
# Held for the session while PostgreSQL builds that index, so replicas build it once.
TRACE_INDEX_LOCK = 5723018
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timeout"})

# Which span it is: its ids, where it sits in its trace and rollout, and what it did.
SPAN_IDENTITY: tuple[str, ...] = (
    "span_id",
    "trace_id",
    "parent_span_id",
    "rollout_id",
    "attempt_id",
    "seq",
    "name",
    "operation",
)
# Column order of a span row; the writer inserts tuples in exactly this order.
SPAN_COLUMNS: tuple[str, ...] = (
    *SPAN_IDENTITY,
    "provider",
    "deployment",
    "model_group",
    "request_model",
    "response_model",
    "response_id",
    "status",
    "http_status",
    "error_type",
    "error_message",
    "stream",
    "start_ns",
    "end_ns",
    "duration_ms",
    "ttft_ms",
    "upstream_ms",
    "overhead_ms",
    "retries",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "finish_reasons",
    "tool_calls",
    "request_body",
    "response_body",
    "attributes",
    "tags",
    # Training: base64 of little-endian int32 / float32 arrays (store/packed.py), the
    # deployment's model version, the rollout's mode, and time held by a pause.
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "model_version",
    "mode",
    "held_ms",
    # The status the upstream answered (or the gateway judged its failure to be).
    "upstream_status",
)


MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def migrate(target: str | Path) -> None:
    """Bring the store's schema up to date (Alembic, imported only here: reads start fast)."""
    # Alembic narrates every plugin and step at INFO; a gateway's start log needs none of it.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    if is_postgres(target):
        url = "postgresql+psycopg://" + libpq_url(str(target)).split("://", 1)[1]
    else:
        url = f"sqlite:///{Path(target).resolve()}"
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
            if is_postgres(target):
                _build_trace_index(conn.execution_options(isolation_level="AUTOCOMMIT"))
    finally:
        engine.dispose()


def _build_trace_index(conn: Any) -> None:
    """Migration 0009's index on PostgreSQL, built concurrently (outside any transaction):
    the first index to scan `spans`, which may hold millions of rows while replicas of the
    version before keep inserting into it. A store made at 0009 or later has it already."""
    from sqlalchemy import text

    conn.execute(text(f"select pg_advisory_lock({TRACE_INDEX_LOCK})"))
    try:
        valid = conn.execute(
            text(f"select indisvalid from pg_index where indexrelid = to_regclass('{TRACE_INDEX}')")
        ).scalar()
        if valid:
            return
        if valid is False:
            # An interrupted build leaves an invalid index, which no query uses.
            conn.execute(text(f"drop index concurrently if exists {TRACE_INDEX}"))
        conn.execute(
            text(
                f"create index concurrently {TRACE_INDEX} on spans (trace_id, start_ns) "
                f"where {TRACED_SPANS}"
            )
        )
    finally:
        conn.execute(text(f"select pg_advisory_unlock({TRACE_INDEX_LOCK})"))


def connect(path: str | Path, *, read_only: bool = False) -> Any:
    """Open the store; writers get the schema (and WAL mode on SQLite), readers never write.

    A `postgresql://` URL gives a `PgDatabase`, which runs the same SQL.
    """
    if is_postgres(path):
        if not read_only:
            _migrate_reporting(path)
        return PgDatabase(str(path), read_only=read_only)
    from store.errors import StoreUnavailable

    try:
        if read_only:
            uri = f"file:{Path(path).resolve()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        # No such folder, no permission: one line naming the file. Errors past this point
        # (a locked file) stay sqlite3's, which callers retry.
        raise StoreUnavailable(f"cannot open {path}: {exc}") from None
    conn.execute("PRAGMA busy_timeout = 5000")
    if read_only:
        # Plugins are never used here, and scanning entry points costs ~50 ms per start.
        return Database(conn, execute_plugins=False)
    # Before the first table exists, so pruned pages can be handed back to the file system
    # a few at a time (store.retention.reclaim); on an older file it waits for a VACUUM.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db = Database(conn, execute_plugins=False)
    db.enable_wal()
    # NORMAL keeps committed rows across a process kill; only a power loss can cost the tail.
    conn.execute("PRAGMA synchronous = NORMAL")
    migrate(path)
    return db


def _migrate_reporting(url: str | Path) -> None:
    """Migrate, turning a connection failure into one clear, password-masked line."""
    from sqlalchemy.exc import OperationalError

    from store.backend import connect_postgres
    from store.errors import StoreUnavailable

    # psycopg's own message first: SQLAlchemy's wraps it in pages of context.
    connect_postgres(str(url)).close()
    try:
        migrate(url)
    except OperationalError as exc:
        raise StoreUnavailable(f"cannot migrate the store: {exc.orig}") from None
