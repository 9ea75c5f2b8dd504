"""`spans.upstream_status`: the status the upstream answered, beside `http_status` (the
status the client got), which differ when a stream fails after its 200 went out."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from store.tables import UPSTREAM_STATUS_COLUMN

revision = "0005_upstream_status"
down_revision = "0004_proxy_state"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created from 0001 on this version already has it (0001 builds today's tables).
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("spans")}
    if UPSTREAM_STATUS_COLUMN not in present:
        op.add_column("spans", sa.Column(UPSTREAM_STATUS_COLUMN, sa.Integer()))


def downgrade() -> None:
    op.drop_column("spans", UPSTREAM_STATUS_COLUMN)
