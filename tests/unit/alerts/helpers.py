"""What the alerts tests share: one alert of every kind, the real stores over one database, an evaluator
whose `send` records what this instance would hand to Slack, and spend / audit rows as finished
requests leave them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from spendgate.alerts import messages as render
from spendgate.alerts.dedupe import DedupeKey
from spendgate.alerts.evaluator import AlertEvaluator
from spendgate.alerts.messages import Alert
from spendgate.settings import Settings, parse_settings
from spendgate.stages.call import new_request_id
from spendgate.store import Database, audit
from spendgate.store.alerts import AlertMarks
from spendgate.store.audit import AuditRow
from spendgate.store.budgets import ReserveRequest, Settlement, apply
from spendgate.store.keys import KeyStore
from spendgate.store.models import AlertSent
from spendgate.store.reports import Reports

UTC = timezone.utc
NANO = 1_000_000_000
CENT = 10_000_000
NOW = datetime(2026, 11, 25, 13, 30, tzinfo=UTC)


# One alert of every kind.
ALL_ALERTS = [
    render.threshold_alert("global", "global", "week", 50, NANO, 2 * NANO, NOW, NOW + timedelta(days=3)),
    render.cap_blocked_alert("team", "core", "day", NANO, NANO, NOW, NOW + timedelta(hours=10), "bob", None, "openai"),
    render.cap_blocked_summary(DedupeKey.cap_blocked("team", "core", "day", NOW), "team", "core", "day", 41, 42, NOW,
                               NOW + timedelta(hours=10), "2026-11-25T14"),
    render.spike_alert("carol", 1, 300, 240, 5 * NANO, 3.0, 0.1 * NANO, "240 requests vs usual 3.0", NOW, "core"),
    render.backstop_budget_alert("openai", Decimal("120.5"), Decimal("100"), 90 * NANO, NOW, "2026-11-25"),
    render.backstop_mismatch_alert("anthropic", Decimal("10"), 5 * NANO, 0.2, NOW, "2026-11-25"),
    render.shadow_alert("dora", "openai", 3, 0, "2026-11-25", "core"),
    render.shadow_alert(None, "anthropic", 0, 1, "2026-11-25"),
    render.store_failing_alert("OperationalError", "host:1", "2026-11-25T13"),
    render.hello_alert(),
]


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def settings(**alerts: Any) -> Settings:
    return parse_settings({"alerts": alerts}, {})


@dataclass
class Stores:
    """The stores the alert code reads and writes, over one database."""

    db: Database
    keys: KeyStore
    marks: AlertMarks
    reports: Reports

    @classmethod
    def of(cls, db: Database) -> Stores:
        return cls(db, KeyStore(db), AlertMarks(db), Reports(db))

    def mark(self, dedupe_key: str) -> AlertSent | None:
        """An alert's "sent" mark."""
        return next((a for a in self.marks.recent(limit=None) if a.dedupe_key == dedupe_key), None)


class Sent(list[Alert]):
    """The evaluator's `send`: records what this instance would hand to Slack, and marks it
    delivered as the Slack sender does."""

    def __init__(self, marks: AlertMarks) -> None:
        super().__init__()
        self.marks = marks

    def __call__(self, alert: Alert) -> None:
        self.append(alert)
        try:
            self.marks.mark(alert.dedupe_key, "delivered")
        except Exception:  # noqa: BLE001 - a broken store is what some tests are about
            pass


def evaluator(st: Stores, cfg: Settings | None = None, **kw: Any) -> tuple[AlertEvaluator, Sent]:
    sent = Sent(st.marks)
    return AlertEvaluator(cfg or settings(), st.marks, st.reports, st.keys.user_team, sent, **kw), sent


def spend(st: Stores, scope: str, name: str, nusd: int, at: datetime = NOW) -> None:
    """Hold and settle `nusd` against a budget, as a finished request does."""
    b = next(b for b in st.keys.load_budgets() if (b.scope, b.name) == (scope, name))
    with st.db.transaction() as conn:
        (r,) = apply(conn, [], [ReserveRequest(new_request_id(), (b,), 0, at, timedelta(minutes=10))])
    assert r.blocked is None
    with st.db.transaction() as conn:
        apply(conn, [Settlement(new_request_id(), r.refs, nusd)], [])


def audit_rows(st: Stores, user: str, times: list[datetime], cost_nusd: int = 0, provider: str = "openai") -> None:
    """Finished requests' audit rows, as the writer inserts them."""
    rows = [AuditRow(id=new_request_id(), started_at=t, ended_at=t, user=user, provider=provider,
                     host="api.openai.com", method="POST", path="/v1/chat/completions", endpoint_kind="chat",
                     outcome="completed", cost_nusd=cost_nusd) for t in times]
    with st.db.transaction() as conn:
        audit.write(conn, rows, [], [])
