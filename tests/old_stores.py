"""Stores as an earlier version left them, for the tests of the migrations after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from store.backend import is_postgres, libpq_url
from store.schema import MIGRATIONS_DIR


def engine_url(target: Any) -> str:
    if is_postgres(target):
        return "postgresql+psycopg://" + libpq_url(str(target)).split("://", 1)[1]
    return f"sqlite:///{Path(target).resolve()}"


def store_at(target: Any, revision: str, *statements: str) -> None:
    """Migrate `target` to `revision`, then run `statements` and say it is at `revision`.

    0001 builds today's tables (and PostgreSQL's test template is migrated already), so
    the statements take away what the migrations after `revision` add, and can add rows.
    """
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(engine_url(target), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            for statement in statements:
                conn.execute(text(statement))
            conn.execute(text(f"update alembic_version set version_num = '{revision}'"))
            conn.commit()
    finally:
        engine.dispose()
