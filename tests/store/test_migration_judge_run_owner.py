"""Migration 0007 gives a store made before it `judge_runs.owner` and `judge_runs.heartbeat_ns`,
on SQLite and on PostgreSQL, and keeps the runs it had."""

from __future__ import annotations

from typing import Any

import pytest
from old_stores import store_at
from servers import head_revision, read_rows

from store.schema import migrate

pytestmark = pytest.mark.both_backends


def _store_before_0007(target: Any) -> None:
    """A store as the previous version left it: migrated to 0006, without the columns, with
    one run it was judging."""
    store_at(
        target,
        "0006_budget_usage",
        "alter table judge_runs drop column owner",
        "alter table judge_runs drop column heartbeat_ns",
        "insert into judge_runs (id, status, judge, created_ns, updated_ns)"
        " values ('jr-old', 'running', 'rules', 1, 2)",
    )


def test_migration_0007_adds_the_owner_and_heartbeat_of_judge_runs(db_path: Any) -> None:
    _store_before_0007(db_path)

    migrate(db_path)
    migrate(db_path)  # running it again changes nothing

    [run] = read_rows(db_path, "select id, status, owner, heartbeat_ns from judge_runs")
    assert run == {"id": "jr-old", "status": "running", "owner": None, "heartbeat_ns": None}
    [version] = read_rows(db_path, "select version_num from alembic_version")
    assert version["version_num"] == head_revision()
