"""The tables spangate 0.1 had (rollouts, attempts, spans, rewards, judge runs, guidelines).

A SQLite file made before Alembic already has them; they are then left as they are.
"""

from __future__ import annotations

from alembic import op

from store.tables import build_metadata

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ("rollouts", "attempts", "spans", "rewards", "judge_runs", "guidelines")


def upgrade() -> None:
    bind = op.get_bind()
    md = build_metadata(bind.dialect.name)
    md.create_all(bind, tables=[md.tables[name] for name in TABLES], checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    md = build_metadata(bind.dialect.name)
    md.drop_all(bind, tables=[md.tables[name] for name in TABLES])
