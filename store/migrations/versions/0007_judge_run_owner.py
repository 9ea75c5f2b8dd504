"""`judge_runs.owner` and `judge_runs.heartbeat_ns`: the process running a judge run and when
it last said so, so a replica starting on a shared store fails only runs nobody runs."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.tables import JUDGE_RUN_OWNER_COLUMNS

revision = "0007_judge_run_owner"
down_revision = "0006_budget_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created from 0001 on this version already has them (0001 builds today's tables).
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("judge_runs")}
    for name, type_ in JUDGE_RUN_OWNER_COLUMNS.items():
        if name not in present:
            op.add_column("judge_runs", sa.Column(name, type_()))


def downgrade() -> None:
    for name in JUDGE_RUN_OWNER_COLUMNS:
        op.drop_column("judge_runs", name)
