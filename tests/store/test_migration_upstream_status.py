"""Migration 0005 gives a store made before it `spans.upstream_status`, on SQLite and on
PostgreSQL, and keeps the spans it had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from servers import head_revision, read_rows

from store.backend import is_postgres, libpq_url
from store.schema import MIGRATIONS_DIR, migrate

pytestmark = pytest.mark.both_backends


def _engine_url(target: Any) -> str:
    if is_postgres(target):
        return "postgresql+psycopg://" + libpq_url(str(target)).split("://", 1)[1]
    return f"sqlite:///{Path(target).resolve()}"


def _store_before_0005(target: Any) -> None:
    """A store as the previous version left it: migrated to 0004, without the column."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(_engine_url(target), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.upgrade(config, "0004_proxy_state")
            # 0001 builds today's tables (and PostgreSQL's test template is migrated already):
            # the previous version's had no such column, and said so.
            conn.execute(text("alter table spans drop column upstream_status"))
            conn.execute(text("update alembic_version set version_num = '0004_proxy_state'"))
            conn.execute(
                text(
                    "insert into spans (span_id, trace_id, name, operation, status, http_status,"
                    " start_ns, end_ns, duration_ms) values ('s1', 't1', 'chat m', 'chat', 'ok',"
                    " 200, 1, 2, 1.0)"
                )
            )
            conn.commit()
    finally:
        engine.dispose()


def test_migration_0005_adds_upstream_status_to_an_older_store(db_path: Any) -> None:
    _store_before_0005(db_path)
    migrate(db_path)
    [span] = read_rows(db_path, "select span_id, http_status, upstream_status from spans")
    assert span == {"span_id": "s1", "http_status": 200, "upstream_status": None}
    [version] = read_rows(db_path, "select version_num from alembic_version")
    assert version["version_num"] == head_revision()
    # Running it again changes nothing.
    migrate(db_path)
