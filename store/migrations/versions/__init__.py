"""Alembic revisions, oldest first by their numbers."""
