"""Reads for people and for the alert evaluator: usage reports, recent activity, provider totals,
budgets past a threshold (SQLAlchemy Core)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

import sqlalchemy as sa

from spendgate.periods import PERIODS, period_end, period_start
from spendgate.store import Database, StoreError
from spendgate.store.models import AuditRecord, Budget, BudgetSpend


class Reports:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = db.engine
        self.is_sqlite = db.is_sqlite

    def usage_report(
        self, by: str, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Spend and tokens grouped by user, team, model, provider or day. Money in nano-USD (exact sums)."""
        t = AuditRecord.__table__  # type: ignore[attr-defined]
        if by == "day":
            key: Any = sa.func.date(t.c.started_at) if self.is_sqlite else sa.cast(t.c.started_at, sa.Date)
        elif by == "model":
            key = sa.func.coalesce(t.c.model_reported, t.c.model_requested)
        elif by in ("user", "team", "provider"):
            key = t.c[by]
        else:
            raise StoreError(f"cannot group by {by!r}; use user, team, model, provider or day")
        q = sa.select(
            key.label("key"),
            sa.func.count().label("requests"),
            sa.func.coalesce(sa.func.sum(t.c.input_tokens), 0).label("input_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.output_tokens), 0).label("output_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.cache_read_tokens), 0).label("cache_read_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.cache_write_tokens), 0).label("cache_write_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.reasoning_tokens), 0).label("reasoning_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.cost_nusd), 0).label("cost_nusd"),
            sa.func.sum(sa.case((t.c.cost_nusd.is_(None) & (t.c.input_tokens + t.c.output_tokens > 0), 1),
                                else_=0)).label("unpriced"),
        )
        if since:
            q = q.where(t.c.started_at >= since.astimezone(timezone.utc))
        if until:
            q = q.where(t.c.started_at < until.astimezone(timezone.utc))
        q = q.group_by(key).order_by(key)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def activity_by_user(
        self, since: datetime, until: datetime | None = None, users: Sequence[str] | None = None
    ) -> dict[str, tuple[int, int]]:
        """{user: (requests, cost nano-USD)} for audit rows started in [since, until)."""
        t = AuditRecord.__table__  # type: ignore[attr-defined]
        q = (sa.select(t.c.user, sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.cost_nusd), 0))
             .where(t.c.started_at >= since, t.c.user.is_not(None)))
        if until is not None:
            q = q.where(t.c.started_at < until)
        if users is not None:
            q = q.where(t.c.user.in_(list(users)))
        with self.engine.connect() as conn:
            return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(q.group_by(t.c.user))}

    def provider_spend_nusd(self, provider: str, since: datetime, until: datetime) -> int:
        """What the gateway attributed to one provider over [since, until), nano-USD."""
        t = AuditRecord.__table__  # type: ignore[attr-defined]
        q = (sa.select(sa.func.coalesce(sa.func.sum(t.c.cost_nusd), 0))
             .where(t.c.provider == provider, t.c.started_at >= since, t.c.started_at < until))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def crossed_budgets(self, now: datetime, min_percent: int) -> list[dict[str, Any]]:
        """Budgets whose settled spend this period is at least `min_percent` of their (non-zero) cap.

        One query for every budget (the alert evaluator runs it every second on every instance);
        rows are shaped like `budget_status()`.
        """
        bt = Budget.__table__  # type: ignore[attr-defined]
        sp = BudgetSpend.__table__  # type: ignore[attr-defined]
        starts = {p: period_start(p, now) for p in PERIODS}
        on = sa.and_(sp.c.budget_id == bt.c.id,
                     sa.or_(*[sa.and_(bt.c.period == p, sp.c.period_start == st) for p, st in starts.items()]))
        q = (sa.select(bt.c.scope, bt.c.name, bt.c.period, bt.c.cap_nusd, sp.c.spent_nusd)
             .select_from(bt.join(sp, on))
             .where(bt.c.cap_nusd > 0, sp.c.spent_nusd * 100 >= bt.c.cap_nusd * min_percent))
        with self.engine.connect() as conn:
            return [{
                "scope": r.scope, "name": r.name, "period": r.period, "cap_nusd": int(r.cap_nusd),
                "spent_nusd": int(r.spent_nusd), "period_start": starts[r.period],
                "resets_at": period_end(r.period, now),
            } for r in conn.execute(q)]
