"""The pause state (`/api/proxy/pause`) in the store, so every replica holds or rejects."""

from __future__ import annotations

from alembic import op

from store.tables import build_metadata

revision = "0004_proxy_state"
down_revision = "0003_features"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    build_metadata(bind.dialect.name).tables["proxy_state"].create(bind, checkfirst=True)


def downgrade() -> None:
    op.drop_table("proxy_state")
