"""Migration 0007 gives a store made before it `judge_runs.owner` and `judge_runs.heartbeat_ns`,
on SQLite and on PostgreSQL, and keeps the runs it had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from servers import head_revision, read_rows

from store.backend import is_postgres, libpq_url
from store.schema import MIGRATIONS_DIR, migrate

pytestmark = pytest.mark.both_backends


def _store_before_0007(target: Any) -> None:
    """A store as the previous version left it: migrated to 0006, without the columns, with
    one run it was judging."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text
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
            command.upgrade(config, "0006_budget_usage")
            # 0001 builds today's tables: the previous version's had no such columns.
            for column in ("owner", "heartbeat_ns"):
                conn.execute(text(f"alter table judge_runs drop column {column}"))
            conn.execute(text("update alembic_version set version_num = '0006_budget_usage'"))
            conn.execute(
                text(
                    "insert into judge_runs (id, status, judge, created_ns, updated_ns)"
                    " values ('jr-old', 'running', 'rules', 1, 2)"
                )
            )
            conn.commit()
    finally:
        engine.dispose()


def test_migration_0007_adds_the_owner_and_heartbeat_of_judge_runs(db_path: Any) -> None:
    _store_before_0007(db_path)

    migrate(db_path)
    migrate(db_path)  # running it again changes nothing

    [run] = read_rows(db_path, "select id, status, owner, heartbeat_ns from judge_runs")
    assert run == {"id": "jr-old", "status": "running", "owner": None, "heartbeat_ns": None}
    [version] = read_rows(db_path, "select version_num from alembic_version")
    assert version["version_num"] == head_revision()
