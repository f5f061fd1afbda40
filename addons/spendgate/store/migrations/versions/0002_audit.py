"""Audit log and captured content.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("started_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("user", sa.String(200), nullable=True, index=True),
        sa.Column("team", sa.String(200), nullable=True),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("endpoint_kind", sa.String(16), nullable=False),
        sa.Column("model_requested", sa.String(200), nullable=True),
        sa.Column("model_reported", sa.String(200), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=False, index=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_write_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column("usage_source", sa.String(10), nullable=True),
        sa.Column("cost_nusd", sa.BigInteger(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("request_bytes", sa.Integer(), nullable=False),
        sa.Column("response_bytes", sa.Integer(), nullable=False),
        sa.Column("client_addr", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(300), nullable=True),
        sa.Column("upstream_request_id", sa.String(200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("content_captured", sa.Boolean(), nullable=False),
        sa.Column("instance_id", sa.String(40), nullable=True),
    )
    op.create_table(
        "audit_content",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("captured_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("request_body", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("audit_content")
    op.drop_table("audit_log")
