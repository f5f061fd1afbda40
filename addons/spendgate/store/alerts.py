"""The "sent" marks of Slack alerts (`alerts_sent`): whoever inserts a mark first sends that alert,
so several gateway instances and restarts send each alert once (SQLAlchemy Core)."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from spendgate.store import Database
from spendgate.store.models import AlertSent, utcnow


class AlertMarks:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = db.engine

    def claim(
        self,
        dedupe_key: str,
        kind: str,
        scope: str,
        name: str,
        text: str,
        blocks: str | None = None,
        now: datetime | None = None,
        status: str = "sending",
    ) -> bool:
        """Insert the "sent" mark for an alert. True: this caller won and sends it; False: already marked.

        The primary key makes this exact across gateway instances and restarts.
        """
        now = now or utcnow()
        t = AlertSent.__table__  # type: ignore[attr-defined]
        values = {
            "dedupe_key": dedupe_key[:300], "kind": kind, "scope": scope, "name": name[:200], "sent_at": now,
            "last_at": now, "count": 1, "reported_count": 1, "status": status,
            "attempts": 1 if status == "sending" else 0, "text": text, "blocks": blocks, "error": None,
        }
        stmt = self.db.insert_ignore(t, values)
        with self.engine.begin() as conn:
            # RETURNING, not rowcount: psycopg reports no rowcount for INSERT .. ON CONFLICT DO NOTHING
            return conn.execute(stmt.returning(t.c.dedupe_key)).first() is not None

    def bump(self, dedupe_key: str, n: int = 1, now: datetime | None = None) -> bool:
        """One more occurrence of an already-sent alert (counted, summarised later, not re-sent)."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(sa.update(t).where(t.c.dedupe_key == dedupe_key)
                             .values(count=t.c.count + n, last_at=now or utcnow()))
            return r.rowcount == 1

    def mark(self, dedupe_key: str, status: str, error: str | None = None) -> None:
        """Delivery result: delivered | failed."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.dedupe_key == dedupe_key)
                         .values(status=status, error=None if error is None else error[:2000]))

    def recent(self, kind: str | None = None, since: datetime | None = None,
               limit: int | None = 100) -> list[AlertSent]:
        with Session(self.engine) as s:
            q = select(AlertSent)
            if kind:
                q = q.where(AlertSent.kind == kind)
            if since:
                q = q.where(AlertSent.sent_at >= since)
            q = q.order_by(AlertSent.sent_at.desc(), AlertSent.dedupe_key)  # type: ignore[attr-defined]
            if limit:
                q = q.limit(limit)
            return list(s.exec(q).all())

    def latest(self, kind: str, scope: str, name: str) -> AlertSent | None:
        with Session(self.engine) as s:
            q = (select(AlertSent).where(AlertSent.kind == kind, AlertSent.scope == scope, AlertSent.name == name)
                 .order_by(AlertSent.last_at.desc()).limit(1))  # type: ignore[attr-defined]
            return s.exec(q).first()

    def count(self, kind: str, scope: str, name: str) -> int:
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t)
                                    .where(t.c.kind == kind, t.c.scope == scope, t.c.name == name)).scalar() or 0)

    def unreported(self, kind: str, since: datetime) -> list[AlertSent]:
        """Alerts whose repeats (`count`) have not all been reported yet."""
        with Session(self.engine) as s:
            t = AlertSent.__table__  # type: ignore[attr-defined]
            q = select(AlertSent).where(t.c.kind == kind, t.c.sent_at >= since, t.c.count > t.c.reported_count)
            return list(s.exec(q).all())

    def mark_reported(self, dedupe_key: str, old_reported: int, new_reported: int) -> bool:
        """Compare-and-set, so only one instance reports a batch of repeats."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(sa.update(t).where(t.c.dedupe_key == dedupe_key, t.c.reported_count == old_reported)
                             .values(reported_count=new_reported))
            return r.rowcount == 1

    def retryable(self, now: datetime, max_attempts: int, backoff: timedelta, stale: timedelta) -> list[AlertSent]:
        """Failed deliveries due for another try, and sends left open by an instance that died."""
        with Session(self.engine) as s:
            t = AlertSent.__table__  # type: ignore[attr-defined]
            q = select(AlertSent).where(
                t.c.attempts < max_attempts,
                sa.or_(
                    sa.and_(t.c.status == "failed", t.c.last_at < now - backoff),
                    sa.and_(t.c.status == "sending", t.c.last_at < now - stale),
                ),
            ).limit(50)
            return list(s.exec(q).all())

    def reclaim(self, dedupe_key: str, status: str, attempts: int, now: datetime | None = None) -> bool:
        """Take a failed (or stale) alert for another delivery attempt; exactly one instance wins."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(t).where(t.c.dedupe_key == dedupe_key, t.c.status == status, t.c.attempts == attempts)
                .values(status="sending", attempts=t.c.attempts + 1, last_at=now or utcnow())
            )
            return r.rowcount == 1
