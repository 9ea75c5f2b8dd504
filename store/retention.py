"""Deleting what is older than the retention window, a small batch per transaction, so the
writer is never held long; a rollout still running is never pruned."""

from __future__ import annotations

from typing import Any

import orjson

from store.backend import atomic, dialect_of, json_table

TABLES = ("spans", "rewards", "attempts", "rollouts")

# Ended rollouts last touched before the cutoff, oldest first.
OLD_ROLLOUTS_SQL = """
select id from rollouts
where status != 'running'
  and updated_ns < :cutoff_ns
order by updated_ns
limit :batch
"""

# Calls and rewards that belong to no rollout age on their own.
STRAY_SPANS_SQL = """
select span_id from spans
where rollout_id is null
  and start_ns < :cutoff_ns
limit :batch
"""

STRAY_REWARDS_SQL = """
select id from rewards
where rollout_id is null
  and created_ns < :cutoff_ns
limit :batch
"""


def _ids(db: Any) -> str:
    return f"(select value from {json_table(dialect_of(db), ':ids', 'ids')})"


def _delete(db: Any, table: str, column: str, ids: list[str], *, dry_run: bool) -> int:
    where = f"where {column} in {_ids(db)}"
    params = {"ids": orjson.dumps(ids).decode()}
    if dry_run:
        return int(db.execute(f"select count(*) from {table} {where}", params).fetchone()[0])
    return int(db.execute(f"delete from {table} {where}", params).rowcount)


def prune_batch(db: Any, *, cutoff_ns: int, batch: int, dry_run: bool = False) -> dict[str, int]:
    """Delete (or with `dry_run` count) one batch of what is older than `cutoff_ns`; returns
    rows per table. All zeros means nothing older is left."""
    counts = dict.fromkeys(TABLES, 0)
    params = {"cutoff_ns": cutoff_ns, "batch": batch}
    with atomic(db):
        rollouts = [row[0] for row in db.execute(OLD_ROLLOUTS_SQL, params).fetchall()]
        if rollouts:
            for table in ("spans", "rewards", "attempts"):
                counts[table] += _delete(db, table, "rollout_id", rollouts, dry_run=dry_run)
            if not dry_run:
                _delete(db, "rollout_counters", "rollout_id", rollouts, dry_run=False)
                _delete(db, "budget_usage", "rollout_id", rollouts, dry_run=False)
                _delete(db, "experiment_assignments", "rollout_id", rollouts, dry_run=False)
            counts["rollouts"] += _delete(db, "rollouts", "id", rollouts, dry_run=dry_run)
        spans = [row[0] for row in db.execute(STRAY_SPANS_SQL, params).fetchall()]
        if spans:
            counts["spans"] += _delete(db, "spans", "span_id", spans, dry_run=dry_run)
        rewards = [row[0] for row in db.execute(STRAY_REWARDS_SQL, params).fetchall()]
        if rewards:
            counts["rewards"] += _delete(db, "rewards", "id", rewards, dry_run=dry_run)
    return counts


def prune_all(db: Any, *, cutoff_ns: int, batch: int, dry_run: bool = False) -> dict[str, int]:
    """Every batch in turn until nothing older is left (a dry run counts everything at once)."""
    if dry_run:
        return prune_batch(db, cutoff_ns=cutoff_ns, batch=2**62, dry_run=True)
    total = dict.fromkeys(TABLES, 0)
    while True:
        counts = prune_batch(db, cutoff_ns=cutoff_ns, batch=batch)
        for table, count in counts.items():
            total[table] += count
        if not any(counts.values()):
            return total


# Pages handed back per step: a few MB, so the writer is never held long.
RECLAIM_PAGES = 2048


def reclaim(db: Any, *, pages: int = RECLAIM_PAGES) -> int:
    """Give up to `pages` free pages of a SQLite file back to the file system; the pages left.

    A file made before incremental auto-vacuum (or a PostgreSQL store, whose autovacuum does
    this) reports 0. `vacuum()` is the one-off for older files.
    """
    if dialect_of(db) != "sqlite" or db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        return 0
    db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
    return int(db.execute("PRAGMA freelist_count").fetchone()[0])


def vacuum(db: Any) -> int:
    """All free space of a SQLite file back at once; bytes given back. A file made before
    incremental auto-vacuum is rewritten (and has it from then on). PostgreSQL's autovacuum
    reuses the space by itself: 0."""
    if dialect_of(db) != "sqlite":
        return 0
    before = _file_bytes(db)
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        while reclaim(db):
            pass
    else:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("vacuum")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return max(before - _file_bytes(db), 0)


def _file_bytes(db: Any) -> int:
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    return int(db.execute("PRAGMA page_count").fetchone()[0]) * int(page_size)
