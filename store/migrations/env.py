"""Alembic's entry point: runs the revisions on the connection `store.schema.migrate` hands in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

connection = context.config.attributes["connection"]
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Replicas starting together migrate one at a time; the lock ends with the transaction.
        connection.execute(text("select pg_advisory_xact_lock(5723017)"))
    context.run_migrations()
