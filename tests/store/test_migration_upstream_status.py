"""Migration 0005 gives a store made before it `spans.upstream_status`, on SQLite and on
PostgreSQL, and keeps the spans it had."""

from __future__ import annotations

from typing import Any

import pytest
from old_stores import store_at
from servers import head_revision, read_rows

from store.schema import migrate

pytestmark = pytest.mark.both_backends


def _store_before_0005(target: Any) -> None:
    """A store as the previous version left it: migrated to 0004, without the column."""
    store_at(
        target,
        "0004_proxy_state",
        "alter table spans drop column upstream_status",
        "insert into spans (span_id, trace_id, name, operation, status, http_status,"
        " start_ns, end_ns, duration_ms) values ('s1', 't1', 'chat m', 'chat', 'ok',"
        " 200, 1, 2, 1.0)",
    )


def test_migration_0005_adds_upstream_status_to_an_older_store(db_path: Any) -> None:
    _store_before_0005(db_path)
    migrate(db_path)
    [span] = read_rows(db_path, "select span_id, http_status, upstream_status from spans")
    assert span == {"span_id": "s1", "http_status": 200, "upstream_status": None}
    [version] = read_rows(db_path, "select version_num from alembic_version")
    assert version["version_num"] == head_revision()
    # Running it again changes nothing.
    migrate(db_path)
