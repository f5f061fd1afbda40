"""Fewer index pages written per request: the outcome index keeps only the rows that are not
`completed`, and reservations (only requests in flight) drop their expiry index and, on SQLite,
their rowid.

At c=1 on SQLite a request's commit wrote ~11 pages to the WAL. A completion moved its row's
entry in the outcome index from `incomplete` to `completed`, two pages; now it only leaves the
small part of the index for rows in flight (`completed`, most rows, is found by time instead).
A reservation was a row, its key and its expiry entry, three b-trees; now one. The reservations
table holds only requests in flight, so the expiry sweep reads it whole.

Revision ID: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NOT_COMPLETED = sa.text("outcome <> 'completed'")


def upgrade() -> None:
    op.drop_index("ix_audit_log_outcome", table_name="audit_log")
    op.create_index("ix_audit_log_outcome", "audit_log", ["outcome", "started_at"],
                    sqlite_where=NOT_COMPLETED, postgresql_where=NOT_COMPLETED)
    op.drop_index("ix_reservations_expires_at", table_name="reservations")
    if op.get_bind().dialect.name == "sqlite":
        _reservations_table("reservations_new", sqlite_with_rowid=False)
        op.execute("INSERT INTO reservations_new (request_id, budget_id, period_start, amount_nusd, expires_at) "
                   "SELECT request_id, budget_id, period_start, amount_nusd, expires_at FROM reservations")
        op.drop_table("reservations")
        op.rename_table("reservations_new", "reservations")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _reservations_table("reservations_old")
        op.execute("INSERT INTO reservations_old SELECT * FROM reservations")
        op.drop_table("reservations")
        op.rename_table("reservations_old", "reservations")
    op.create_index("ix_reservations_expires_at", "reservations", ["expires_at"])
    op.drop_index("ix_audit_log_outcome", table_name="audit_log")
    op.create_index("ix_audit_log_outcome", "audit_log", ["outcome"])


def _reservations_table(name: str, **kw: bool) -> None:
    op.create_table(
        name,
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("budget_id", sa.Integer(), primary_key=True),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("amount_nusd", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        **kw,
    )
