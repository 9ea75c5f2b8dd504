"""Experiments and their decisions, the live model registry, rollout budgets and the
training columns of spans (token ids, logprobs, model version, mode, time held)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.tables import ADDED_COLUMNS, build_metadata

revision = "0003_features"
down_revision = "0002_rollout_counters"
branch_labels = None
depends_on = None

TABLES = ("experiments", "experiment_decisions", "model_registry")


def upgrade() -> None:
    bind = op.get_bind()
    md = build_metadata(bind.dialect.name)
    md.create_all(bind, tables=[md.tables[name] for name in TABLES], checkfirst=True)
    inspector = sa.inspect(bind)
    for table, columns in ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for name in columns:
            if name not in present:
                column = md.tables[table].c[name]
                op.add_column(table, sa.Column(name, column.type))


def downgrade() -> None:
    bind = op.get_bind()
    md = build_metadata(bind.dialect.name)
    md.drop_all(bind, tables=[md.tables[name] for name in TABLES])
    for table, columns in ADDED_COLUMNS.items():
        for name in columns:
            op.drop_column(table, name)
