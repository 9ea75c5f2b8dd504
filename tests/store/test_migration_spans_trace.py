"""Migration 0009 gives a store made before it the `spans_trace` index, on SQLite and (built
concurrently, once, after the migrations) on PostgreSQL, so an agent's span finds a call of
its trace in the store."""

from __future__ import annotations

from typing import Any

import pytest
from old_stores import store_at
from servers import head_revision, read_rows

from store.backend import is_postgres
from store.queries import rollouts_of_traces
from store.schema import connect, migrate

pytestmark = pytest.mark.both_backends

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _span(span_id: str, start_ns: int, attempt: str) -> str:
    return (
        "insert into spans (span_id, trace_id, parent_span_id, rollout_id, attempt_id, name,"
        " operation, status, start_ns, end_ns, duration_ms) values"
        f" ('{span_id}', '{TRACE}', '00f067aa0ba902b7', 'r1', '{attempt}', 'chat m', 'chat',"
        f" 'ok', {start_ns}, {start_ns + 1}, 1.0)"
    )


def _store_before_0009(target: Any) -> None:
    """A store as the previous version left it: at 0008, no index, two calls of one trace."""
    store_at(
        target,
        "0008_experiment_assignments",
        "drop index spans_trace",
        _span("s1", 1, "1"),
        _span("s2", 2, "2"),
    )


def _index_state(target: Any) -> Any:
    if is_postgres(target):
        rows = read_rows(
            target, "select indisvalid from pg_index where indexrelid = to_regclass('spans_trace')"
        )
        return rows[0]["indisvalid"] if rows else None
    rows = read_rows(target, "select sql from sqlite_master where name = 'spans_trace'")
    return bool(rows) or None


def _found(target: Any) -> dict[str, tuple[str, str | None]]:
    db = connect(target, read_only=True)
    try:
        return rollouts_of_traces(db, [TRACE, "0" * 32])
    finally:
        db.close()


def test_migration_0009_indexes_the_spans_of_an_older_store_by_trace(db_path: Any) -> None:
    _store_before_0009(db_path)
    assert _index_state(db_path) is None

    migrate(db_path)
    migrate(db_path)  # running it again changes nothing

    assert _index_state(db_path) is True
    [version] = read_rows(db_path, "select version_num from alembic_version")
    assert version["version_num"] == head_revision()
    # The newest call of the trace says where it is, as the gateway's memory would.
    assert _found(db_path) == {TRACE: ("r1", "2")}


def test_an_index_build_cut_short_is_built_again(postgres: Any) -> None:
    # Only PostgreSQL builds it concurrently, so only there can one be left invalid.
    db_path = postgres.new_database()
    _store_before_0009(db_path)
    migrate(db_path)
    # What an interrupted CREATE INDEX CONCURRENTLY leaves behind.
    store_at(
        db_path,
        head_revision(),
        "update pg_index set indisvalid = false where indexrelid = to_regclass('spans_trace')",
    )
    assert _index_state(db_path) is False

    migrate(db_path)

    assert _index_state(db_path) is True
