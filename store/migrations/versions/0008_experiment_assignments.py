"""The `experiment_assignments` table, so replicas on one PostgreSQL give each rollout of a
Thompson experiment one variant even when its calls reach two of them at once."""

from __future__ import annotations

from alembic import op

from store.tables import build_metadata

revision = "0008_experiment_assignments"
down_revision = "0007_judge_run_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    table = build_metadata(bind.dialect.name).tables["experiment_assignments"]
    table.create(bind, checkfirst=True)


def downgrade() -> None:
    op.drop_table("experiment_assignments")
