"""SQLModel tables. Times are UTC; money is integer nano-USD (exact on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no zone, PostgreSQL would convert."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:  # already UTC by this codebase's convention
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index))


class Team(SQLModel, table=True):
    __tablename__ = "teams"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False, unique=True))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False, unique=True))
    team_id: Optional[int] = Field(default=None, foreign_key="teams.id")
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    key_id: str = Field(sa_column=sa.Column(sa.String(16), primary_key=True))
    user_id: int = Field(foreign_key="users.id", index=True)
    state: str = Field(sa_column=sa.Column(sa.String(16), nullable=False, default="active"))
    secret_hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    prev_secret_hash: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    prev_valid_until: Optional[datetime] = _ts(nullable=True)
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    last_used_at: Optional[datetime] = _ts(nullable=True)
    expires_at: Optional[datetime] = _ts(nullable=True)
    revoked_at: Optional[datetime] = _ts(nullable=True)
    allowed_models: str = Field(default="[]", sa_column=sa.Column(sa.Text(), nullable=False, default="[]"))
    rpm: Optional[int] = None
    byok: bool = False
    capture_content: bool = False
    capture_reason: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))


class AdminEvent(SQLModel, table=True):
    __tablename__ = "admin_events"
    id: Optional[int] = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    actor: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    action: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    target: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    before: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    after: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))


class RegistryVersion(SQLModel, table=True):
    """One row; bumped in the same transaction as any key change so gateways reload within a poll."""

    __tablename__ = "registry_version"
    id: int = Field(default=1, primary_key=True)
    version: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False, default=0))


class AuditRecord(SQLModel, table=True):
    """One row per request to a model host: inserted before it goes upstream, completed when it ends."""

    __tablename__ = "audit_log"
    # Rows not `completed` by outcome (in flight, refused, failed: what one looks for by outcome);
    # `completed` ones are most rows, found by time. A completion leaves this index, so it writes one
    # index page, not two (migration 0008). A query uses it only when it says `outcome <> 'completed'`.
    __table_args__ = (sa.Index("ix_audit_log_outcome", "outcome", "started_at",
                               sqlite_where=sa.text("outcome <> 'completed'"),
                               postgresql_where=sa.text("outcome <> 'completed'")),)
    id: str = Field(sa_column=sa.Column(sa.String(40), primary_key=True))
    started_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    ended_at: Optional[datetime] = _ts(nullable=True)
    user: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True, index=True))
    team: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    key_id: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(16), nullable=True))
    provider: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    host: str = Field(sa_column=sa.Column(sa.String(255), nullable=False))
    method: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    path: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    endpoint_kind: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    model_requested: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    model_reported: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    stream: bool = False
    status_code: Optional[int] = None
    outcome: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(10), nullable=True))
    cost_nusd: Optional[int] = Field(default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True))
    latency_ms: Optional[float] = None
    ttft_ms: Optional[float] = None
    request_bytes: int = 0
    response_bytes: int = 0
    client_addr: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    user_agent: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(300), nullable=True))
    upstream_request_id: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    error: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    content_captured: bool = False
    instance_id: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(40), nullable=True))
    cut_fields: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    cost_source: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(16), nullable=True))


class CapturedContent(SQLModel, table=True):
    """Prompt and completion bodies, only for keys with capture on; purged after retention."""

    __tablename__ = "audit_content"
    request_id: str = Field(sa_column=sa.Column(sa.String(40), primary_key=True))
    captured_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    key_id: Optional[str] = Field(default=None, sa_column=sa.Column(sa.String(16), nullable=True))
    reason: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    request_body: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    response_body: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))


class Budget(SQLModel, table=True):
    """A cap for a user, a team or `global`, per day / week / month (UTC)."""

    __tablename__ = "budgets"
    __table_args__ = (sa.UniqueConstraint("scope", "name"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    scope: str = Field(sa_column=sa.Column(sa.String(10), nullable=False))
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    period: str = Field(sa_column=sa.Column(sa.String(10), nullable=False))
    cap_nusd: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    created_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class BudgetSpend(SQLModel, table=True):
    """Settled spend and open reservations of one budget in one period."""

    __tablename__ = "budget_spend"
    budget_id: int = Field(sa_column=sa.Column(sa.Integer(), sa.ForeignKey("budgets.id"), primary_key=True))
    period_start: datetime = Field(sa_column=sa.Column(UTCDateTime(), primary_key=True))
    spent_nusd: int = Field(default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False, default=0))
    reserved_nusd: int = Field(default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False, default=0))


class Reservation(SQLModel, table=True):
    """An estimate held against budgets while its request runs; released on settle or expiry."""

    __tablename__ = "reservations"
    __table_args__ = {"sqlite_with_rowid": False}  # one b-tree, not a row and its key (migration 0008)
    request_id: str = Field(sa_column=sa.Column(sa.String(40), primary_key=True))
    budget_id: int = Field(sa_column=sa.Column(sa.Integer(), primary_key=True))
    period_start: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    amount_nusd: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    expires_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))  # in flight only: no index


class AlertSent(SQLModel, table=True):
    """One Slack alert, keyed so that each (scope, threshold, period)-style event is sent once.

    Whichever gateway instance inserts the row first sends the message; the others skip it.
    Repeats of the same event (more blocked requests, a spike that goes on) bump `count`.
    """

    __tablename__ = "alerts_sent"
    # The evaluator's look-ups of a user's spike episodes (`AlertMarks.latest`, `count`); migration 0004.
    __table_args__ = (sa.Index("ix_alerts_sent_kind_scope_name", "kind", "scope", "name"),)
    dedupe_key: str = Field(sa_column=sa.Column(sa.String(300), primary_key=True))
    kind: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    scope: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    sent_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    last_at: datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    count: int = Field(default=1, sa_column=sa.Column(sa.BigInteger(), nullable=False, default=1))
    reported_count: int = Field(default=1, sa_column=sa.Column(sa.BigInteger(), nullable=False, default=1))
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))  # sending|delivered|failed|folded
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer(), nullable=False, default=0))
    text: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    blocks: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    error: Optional[str] = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))


class RateWindow(SQLModel, table=True):
    """Requests a key made this minute and the last (`--rpm`), shared by every gateway instance."""

    __tablename__ = "rate_windows"
    key_id: str = Field(sa_column=sa.Column(sa.String(16), primary_key=True))
    minute: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))  # minutes since the epoch
    n: int = Field(default=0, sa_column=sa.Column(sa.Integer(), nullable=False, default=0))
    prev_n: int = Field(default=0, sa_column=sa.Column(sa.Integer(), nullable=False, default=0))
