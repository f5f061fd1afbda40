"""Slack alerts: the "already sent" marks shared by every gateway instance.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts_sent",
        sa.Column("dedupe_key", sa.String(300), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("last_at", sa.DateTime(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("reported_count", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("blocks", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_alerts_sent_kind_scope_name", "alerts_sent", ["kind", "scope", "name"])


def downgrade() -> None:
    op.drop_index("ix_alerts_sent_kind_scope_name", "alerts_sent")
    op.drop_table("alerts_sent")
