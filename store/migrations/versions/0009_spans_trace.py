"""An index of spans with a parent by trace, so an agent's OTLP span that names no rollout
finds the rollout of a gateway call in its trace on any replica, and after a restart."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TRACED_SPANS

revision = "0009_spans_trace"
down_revision = "0008_experiment_assignments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created from 0001 on this version already has it (0001 builds today's tables).
    present = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("spans")}
    if "spans_trace" not in present:
        where = sa.text(TRACED_SPANS)
        op.create_index(
            "spans_trace", "spans", ["trace_id"], sqlite_where=where, postgresql_where=where
        )


def downgrade() -> None:
    op.drop_index("spans_trace", table_name="spans")
