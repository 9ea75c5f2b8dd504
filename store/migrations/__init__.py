"""The store's one migration history (Alembic), run for SQLite and PostgreSQL alike."""
