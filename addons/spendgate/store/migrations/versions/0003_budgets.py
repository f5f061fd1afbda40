"""Budgets, per-period spend and reservations.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scope", sa.String(10), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("period", sa.String(10), nullable=False),
        sa.Column("cap_nusd", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("scope", "name"),
    )
    op.create_table(
        "budget_spend",
        sa.Column("budget_id", sa.Integer(), sa.ForeignKey("budgets.id"), primary_key=True),
        sa.Column("period_start", sa.DateTime(), primary_key=True),
        sa.Column("spent_nusd", sa.BigInteger(), nullable=False),
        sa.Column("reserved_nusd", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("budget_id", sa.Integer(), primary_key=True),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("amount_nusd", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("reservations")
    op.drop_table("budget_spend")
    op.drop_table("budgets")
