"""A pruned SQLite file gives its space back: a few MB per writer task in the background,
all at once with `spangate prune --vacuum` (which also converts files made before)."""

from __future__ import annotations

import time
from typing import Any

from click.testing import CliRunner
from servers import read_rows, wait_until
from test_retention import DAY, _ids, _span

from gateway.cli.main import cli
from store.schema import connect
from store.span_inserts import insert_spans


def _bulky_old_rollouts(path: Any, count: int) -> None:
    """`count` ended rollouts from 40 days ago, each with a call holding a 20 kB body."""
    old = time.time_ns() - 40 * DAY
    db = connect(path)
    try:
        spans = []
        for i in range(count):
            span = _span(f"s-bulk-{i}", f"r-bulk-{i}", old)
            span["response_body"] = {"content": "x" * 20_000}
            spans.append(span)
        insert_spans(db, spans)
        db.execute("update rollouts set status = 'succeeded', updated_ns = :at", {"at": old})
    finally:
        db.close()


def _file_mb(path: Any) -> float:
    return (
        sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)) / 1e6
    )


def test_background_retention_gives_the_space_back_to_the_file_system(
    db_path: Any, make_gateway: Any
) -> None:
    _bulky_old_rollouts(db_path, 500)
    full = _file_mb(db_path)
    assert full > 8
    make_gateway(retention={"days": 30, "interval": 0.2, "batch_size": 100})
    wait_until(lambda: _ids(db_path, "rollouts") == [], timeout=15)
    wait_until(lambda: read_rows(db_path, "pragma freelist_count")[0]["freelist_count"] == 0)
    pages = read_rows(db_path, "pragma page_count")[0]["page_count"]
    assert pages * 4096 < full * 1e6 / 4


def test_prune_vacuum_shrinks_a_file_made_before_incremental_vacuum(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    # A file from an earlier release: its tables exist before auto-vacuum could be set.
    sqlite3.connect(path).execute("create table keep_me (x)").connection.close()
    _bulky_old_rollouts(path, 300)
    assert read_rows(path, "pragma auto_vacuum")[0]["auto_vacuum"] == 0
    runner = CliRunner()
    done = runner.invoke(cli, ["prune", "--older-than", "30d", "--vacuum", "--db", str(path)])
    assert done.exit_code == 0, done.output
    removed, freed = done.output.strip().splitlines()
    assert removed == "removed: 300 spans, 0 rewards, 300 attempts, 300 rollouts"
    assert freed.startswith("gave back ") and float(freed.split()[2]) > 5
    assert read_rows(path, "pragma auto_vacuum")[0]["auto_vacuum"] == 2
