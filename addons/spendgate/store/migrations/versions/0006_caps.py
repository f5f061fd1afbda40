"""Audit rows say where their price came from; `--rpm` counts shared by every instance.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("cost_source", sa.String(16), nullable=True))
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("prev_n", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("cost_source")
