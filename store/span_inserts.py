"""How a batch of span records goes into the store in one transaction: SQLite by
`executemany`, PostgreSQL by COPY, with each span's rollout and attempt made on first sight.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, cast

from store.backend import atomic, dialect_of
from store.records import clean_span, json_text, span_row
from store.schema import SPAN_COLUMNS

# Python 3.11's sqlite3 looks for an adapter for every None it binds, the slow way (a third
# of a span row's are None): a registered one is found at once. `{}.get` hands None back
# from C, and None binds as NULL as before (bench/results/none_binding.md).
_NONE_TO_NONE = cast(Callable[[None], None], {}.get)
sqlite3.register_adapter(type(None), _NONE_TO_NONE)

# Only a span id already stored is skipped (replay is idempotent); any other constraint
# failure raises, so the record is quarantined with its reason instead of vanishing.
_INSERT_SPAN = (
    f"INSERT INTO spans ({', '.join(SPAN_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in SPAN_COLUMNS)}) "
    "ON CONFLICT (span_id) DO NOTHING"
)
_ENSURE_ROLLOUT = """
INSERT INTO rollouts (id, status, agent, metadata, tags, created_ns, updated_ns)
VALUES (?, 'running', ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET updated_ns = CASE
    WHEN excluded.updated_ns > rollouts.updated_ns THEN excluded.updated_ns
    ELSE rollouts.updated_ns END
"""
_ENSURE_ATTEMPT = """
INSERT INTO attempts (rollout_id, id, number, status, created_ns, updated_ns)
VALUES (
    :rollout_id, :id,
    (SELECT coalesce(max(number), 0) + 1 FROM attempts WHERE rollout_id = :rollout_id),
    'running', :now, :now
)
ON CONFLICT (rollout_id, id) DO UPDATE SET updated_ns = CASE
    WHEN excluded.updated_ns > attempts.updated_ns THEN excluded.updated_ns
    ELSE attempts.updated_ns END
"""
# PostgreSQL takes a batch by COPY into a session-local table, then one INSERT ... SELECT
# that skips span ids already stored.
_PG_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS spans_in ON COMMIT DELETE ROWS AS "
    f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans WITH NO DATA"
)
_PG_COPY = f"COPY spans_in ({', '.join(SPAN_COLUMNS)}) FROM STDIN"
_PG_COPY_SPANS = f"COPY spans ({', '.join(SPAN_COLUMNS)}) FROM STDIN"
# Replicas insert one batch at a time, so `rowid` order is commit order and a follower
# reading "rowid > last seen" never skips a row committed late with a lower id.
_PG_SERIALIZE = "SELECT pg_advisory_xact_lock(7291)"
# Delivered at commit: every replica's live streams wake (store.shared_state listens).
_PG_NOTIFY = "NOTIFY spangate_spans"
_PG_MOVE = (
    f"INSERT INTO spans ({', '.join(SPAN_COLUMNS)}) "
    f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans_in ON CONFLICT (span_id) DO NOTHING"
)


def normalize_span(record: dict[str, Any]) -> dict[str, Any]:
    """A span record made plain JSON (bodies as text) so it can be journaled or inserted."""
    return clean_span(record)


def _no_nul(row: list[Any]) -> list[Any]:
    # PostgreSQL text cannot hold NUL, which SQLite stores: the record is kept, the NUL marked.
    # One search over the row's text first: nearly every row has none.
    if "\x00" not in "".join([v for v in row if v.__class__ is str]):
        return row
    return [v.replace("\x00", "\ufffd") if v.__class__ is str and "\x00" in v else v for v in row]


def insert_spans(db: Any, records: list[dict[str, Any]]) -> None:
    """Insert spans and create their rollouts and attempts on first sight, in one transaction.

    `db` is the writer's store (`Database` or `PgDatabase`); a bare sqlite3 connection works too.
    """
    rows = [span_row(r) for r in records]
    start_at = SPAN_COLUMNS.index("start_ns")
    end_at = SPAN_COLUMNS.index("end_ns")
    rollouts: dict[str, dict[str, Any]] = {}
    attempts: dict[tuple[str, str], int] = {}
    for record, row in zip(records, rows, strict=True):
        rid = row[3]
        if not rid:
            continue
        start, end = row[start_at], row[end_at]
        seen = rollouts.get(rid)
        if seen is None:
            rollouts[rid] = {
                "start_ns": start,
                "end_ns": end,
                "agent": record.get("agent"),
                "metadata": record.get("metadata"),
                "tags": record.get("tags"),
            }
        else:
            seen["start_ns"] = min(seen["start_ns"], start)
            seen["end_ns"] = max(seen["end_ns"], end)
            for key in ("agent", "metadata", "tags"):
                seen[key] = seen[key] or record.get(key)
        aid = row[4]
        if aid:
            attempts[(rid, aid)] = max(attempts.get((rid, aid), 0), end)
    rollout_rows = [
        (
            rid,
            info["agent"] if isinstance(info["agent"], str) else None,
            json_text(info["metadata"]) or "{}",
            json_text(info["tags"]) or "[]",
            info["start_ns"],
            info["end_ns"],
        )
        for rid, info in rollouts.items()
    ]
    attempt_rows = [
        {"rollout_id": rid, "id": aid, "now": end} for (rid, aid), end in attempts.items()
    ]
    if dialect_of(db) == "postgresql":
        _insert_postgres(db, rows, rollout_rows, attempt_rows)
        return
    db_conn = db if isinstance(db, sqlite3.Connection) else db.conn
    cur = db_conn.cursor()
    cur.execute("BEGIN")
    try:
        cur.executemany(_ENSURE_ROLLOUT, rollout_rows)
        cur.executemany(_ENSURE_ATTEMPT, attempt_rows)
        cur.executemany(_INSERT_SPAN, rows)
        cur.execute("COMMIT")
    except BaseException:
        if db_conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
        raise


def _insert_postgres(
    db: Any, rows: list[list[Any]], rollout_rows: list[Any], attempt_rows: list[Any]
) -> None:
    from psycopg.errors import UniqueViolation

    rows = [_no_nul(row) for row in rows]
    # Rows locked in one order by every replica: two batches touching the same rollouts in
    # opposite orders would otherwise deadlock, and one of them spill.
    rollout_rows = sorted(rollout_rows)
    attempt_rows = sorted(attempt_rows, key=lambda row: (row["rollout_id"], row["id"]))
    with atomic(db):
        # One round trip for all the rollouts and attempts, not one per row.
        with db.conn.pipeline():
            if rollout_rows:
                db.executemany(_ENSURE_ROLLOUT, rollout_rows)
            if attempt_rows:
                db.executemany(_ENSURE_ATTEMPT, attempt_rows)
            db.execute(_PG_SERIALIZE)
        try:
            # New spans (nearly every batch) go straight in: half the server's work of
            # staging them first.
            with db.conn.transaction(), db.conn.cursor().copy(_PG_COPY_SPANS) as copy:
                for row in rows:
                    copy.write_row(row)
        except UniqueViolation:
            # A journal replayed after a partial write: stage, and skip what is stored.
            db.execute(_PG_STAGE)
            with db.conn.cursor().copy(_PG_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
            db.execute(_PG_MOVE)
        db.execute(_PG_NOTIFY)
