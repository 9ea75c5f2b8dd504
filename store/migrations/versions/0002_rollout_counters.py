"""Per-rollout sequence counters, so replicas sharing one store number calls without gaps."""

from __future__ import annotations

from alembic import op

from store.tables import build_metadata

revision = "0002_rollout_counters"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    build_metadata(bind.dialect.name).tables["rollout_counters"].create(bind, checkfirst=True)


def downgrade() -> None:
    op.drop_table("rollout_counters")
