"""The audit log: one row per request to a model host, and captured content (prepared SQL, `plain`).

`AuditRow` is the row: its fields are the table's columns (a test holds them to the model and the
migrations), they drive the INSERT and UPDATE statements, and the CLI lists them. A row is inserted
before its request goes upstream and completed, with `COMPLETION` columns only, when it ends.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from spendgate.store import Database
from spendgate.store.models import AuditRecord, CapturedContent
from spendgate.store.plain import Prepared, Transaction


@dataclass(slots=True, kw_only=True)
class AuditRow:
    # In the table's column order (the CLI lists them so); keyword-only, so required fields need not come first.
    id: str
    started_at: datetime
    ended_at: datetime | None = None
    user: str | None = None
    team: str | None = None
    key_id: str | None = None
    provider: str
    host: str
    method: str
    path: str
    endpoint_kind: str
    model_requested: str | None = None
    model_reported: str | None = None
    stream: bool = False
    status_code: int | None = None
    outcome: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: str | None = None
    cost_nusd: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    client_addr: str | None = None
    user_agent: str | None = None
    upstream_request_id: str | None = None
    error: str | None = None
    content_captured: bool = False
    instance_id: str | None = None
    cut_fields: str | None = None
    cost_source: str | None = None  # provider | override | fallback | unknown

    def params(self, columns: tuple[str, ...]) -> dict[str, Any]:
        """The row's values by column name. StrEnum values stay as they are: sqlite3 binds them as text,
        and `pgbatch` sends JSON, where they are their value."""
        return dict(zip(columns, self.values(columns)))

    def values(self, columns: tuple[str, ...]) -> tuple[Any, ...]:
        """The row's values of `columns`, in that order."""
        getter = _GETTERS.get(columns)
        if getter is None:
            one = operator.attrgetter(*columns)
            getter = _GETTERS[columns] = one if len(columns) > 1 else lambda row: (one(row),)
        return getter(self)


_GETTERS: dict[tuple[str, ...], Callable[[AuditRow], tuple[Any, ...]]] = {}


COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AuditRow))
# What is only known when the request ends.
COMPLETION: tuple[str, ...] = (
    "ended_at", "status_code", "outcome", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "usage_source", "cost_nusd", "cost_source", "latency_ms", "ttft_ms", "response_bytes",
    "model_reported", "upstream_request_id", "error", "cut_fields",
)
COMPLETE_COLUMNS = ("id", *COMPLETION)  # a completion's UPDATE: the row's id, and what it sets
# The columns a row keeps when the store rejects it: it must still say who, when, where and how it ended.
ESSENTIAL = frozenset({"id", "started_at", "provider", "host", "method", "path", "endpoint_kind", "outcome",
                       "instance_id", "user", "team", "key_id"})


@dataclass(frozen=True)
class ContentRow:
    request_id: str
    captured_at: datetime
    key_id: str | None
    reason: str
    request_body: str | None
    response_body: str | None


_TIMES = ("started_at", "ended_at")


def _statement(sql: str, cols: Sequence[str]) -> Prepared:
    return Prepared(sql, [c for c in (*_TIMES, "captured_at") if c in cols])


# Prepared statements on the plain driver (`plain`): these run for every request.
# Column names are quoted: `user` is reserved in PostgreSQL.
_INSERT = _statement(
    "INSERT INTO audit_log (" + ", ".join(f'"{c}"' for c in COLUMNS) + ") VALUES ("
    + ", ".join(f":{c}" for c in COLUMNS) + ")", COLUMNS)
_COMPLETE = _statement(
    "UPDATE audit_log SET " + ", ".join(f'"{c}" = :{c}' for c in COMPLETION) + " WHERE id = :id", COMPLETE_COLUMNS)
_CONTENT_COLUMNS = tuple(f.name for f in dataclasses.fields(ContentRow))
_CONTENT = _statement(
    "INSERT INTO audit_content (" + ", ".join(_CONTENT_COLUMNS) + ") VALUES ("
    + ", ".join(f":{c}" for c in _CONTENT_COLUMNS) + ")", _CONTENT_COLUMNS)


def write(conn: Transaction, inserts: Sequence[AuditRow], completions: Sequence[AuditRow],
          contents: Sequence[ContentRow]) -> None:
    """One batch's audit writes on the writer's connection (its transaction)."""
    if inserts:
        conn.execute_values(_INSERT, [r.values(_INSERT.names) for r in inserts])
    if completions:
        conn.execute_values(_COMPLETE, [r.values(_COMPLETE.names) for r in completions])
    if contents:
        conn.execute(_CONTENT, [dataclasses.asdict(c) for c in contents])


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def mark_stale_incomplete(self, older_than: datetime) -> int:
        """Rows a dead gateway left open: say so, so nobody mistakes them for in-flight requests."""
        table = AuditRecord.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(table)
                .where(*_by_outcome(table, "incomplete"), table.c.ended_at.is_(None), table.c.started_at < older_than,
                       table.c.error.is_(None))
                .values(error="gateway stopped before the request ended")
            )
            return int(r.rowcount or 0)

    def mark_instance_incomplete(self, instance_id: str) -> int:
        table = AuditRecord.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(table)
                .where(*_by_outcome(table, "incomplete"), table.c.instance_id == instance_id,
                       table.c.ended_at.is_(None))
                .values(error="gateway stopped before the request ended")
            )
            return int(r.rowcount or 0)

    def purge_content(self, older_than: datetime) -> int:
        t = CapturedContent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(sa.delete(t).where(t.c.captured_at < older_than))
            return int(r.rowcount or 0)

    def rows(
        self,
        *,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        outcome: str | None = None,
        limit: int | None = 100,
    ) -> list[AuditRow]:
        """Newest first."""
        t = AuditRecord.__table__  # type: ignore[attr-defined]
        q = sa.select(*[t.c[c] for c in COLUMNS])
        if user:
            q = q.where(t.c.user == user)
        if since:
            q = q.where(t.c.started_at >= since)
        if until:
            q = q.where(t.c.started_at < until)
        if outcome:
            q = q.where(*_by_outcome(t, outcome))
        q = q.order_by(t.c.started_at.desc(), t.c.id)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [AuditRow(**r._mapping) for r in conn.execute(q)]


def _by_outcome(table: Any, outcome: str) -> list[Any]:
    """The terms for rows of one outcome; for any but `completed` with the one that lets SQLite use
    the outcome index (it holds only those rows, migration 0008, and SQLite does not infer it)."""
    terms = [table.c.outcome == outcome]
    if outcome != "completed":
        terms.append(table.c.outcome != "completed")
    return terms
