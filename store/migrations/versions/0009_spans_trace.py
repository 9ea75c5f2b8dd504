"""An index of spans with a parent by trace, so an agent's OTLP span that names no rollout
finds the rollout of a gateway call in its trace on any replica, and after a restart."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.schema import TRACE_INDEX, TRACED_SPANS

revision = "0009_spans_trace"
down_revision = "0008_experiment_assignments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Built by store.schema.migrate once the migrations are done, concurrently: inside
        # this transaction the build would stop every replica's span inserts until it ends.
        return
    # A store created from 0001 on this version already has it (0001 builds today's tables).
    if TRACE_INDEX not in {i["name"] for i in sa.inspect(bind).get_indexes("spans")}:
        where = sa.text(TRACED_SPANS)
        op.create_index(TRACE_INDEX, "spans", ["trace_id", "start_ns"], sqlite_where=where)


def downgrade() -> None:
    op.drop_index(TRACE_INDEX, table_name="spans")
