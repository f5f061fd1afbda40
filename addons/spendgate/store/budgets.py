"""Budget spend and reservations: the caps' hot path (prepared SQL through the plain driver, `plain`).

A request's estimate is held against every cap that applies with one conditional UPDATE per
cap, in the same group commit as the audit rows (`writer`); settlement replaces the hold by the
actual cost in the transaction that completes the request's audit row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlmodel import Session, select

from spendgate.periods import period_end, period_start
from spendgate.store import Database
from spendgate.store.models import Budget, BudgetSpend, Reservation, utcnow
from spendgate.store.plain import Prepared, Transaction


@dataclass(frozen=True)
class BudgetDef:
    id: int
    scope: str  # user | team | global
    name: str
    period: str
    cap_nusd: int


@dataclass(frozen=True)
class BudgetRef:
    """One budget a reservation was held against, in the period it was held in."""

    budget_id: int
    period_start: datetime


@dataclass(frozen=True)
class Blocked:
    scope: str
    name: str
    period: str
    spent_nusd: int
    reserved_nusd: int
    cap_nusd: int
    resets_at: datetime


@dataclass(frozen=True)
class ReserveResult:
    refs: tuple[BudgetRef, ...]
    remaining_nusd: int | None  # the tightest cap's headroom after this reservation
    blocked: Blocked | None = None


@dataclass(frozen=True)
class ReserveRequest:
    request_id: str
    budgets: tuple[BudgetDef, ...]
    amount_nusd: int
    now: datetime
    ttl: timedelta


@dataclass(frozen=True)
class Settlement:
    """A finished request's holds replaced by what it actually cost (0 when it never reached the provider)."""

    request_id: str
    refs: tuple[BudgetRef, ...]
    actual_nusd: int


def apply(conn: Transaction, settles: Sequence[Settlement], reserves: Sequence[ReserveRequest]) -> list[ReserveResult]:
    """Settlements and reservations of one batch, in one pass over the budget rows.

    Each hold is one conditional UPDATE (spent + reserved + amount <= cap), so concurrent
    requests on any number of gateway instances can never jointly pass a cap. Rows are
    visited in (budget, period) order, so two instances' batches cannot deadlock on
    PostgreSQL. A request refused by one of its caps gives back the holds it already took
    (rows this transaction has locked), so a reservation is all or none.
    Prepared statements on the plain driver: this runs for every capped request on SQLite; on
    PostgreSQL `spendgate_write_batch` runs the same statements in one round trip (`pgbatch`), and
    `batches.settle_and_reserve` picks between the two.
    """
    # Settlements: replace reservations by actual cost (0 when the request failed).
    deltas: dict[tuple[int, datetime], list[int]] = {}  # (budget, period) -> [held, actual]
    for st in settles:
        held = {int(r.budget_id): int(r.amount_nusd) for r in conn.execute(_UNRESERVE, {"rid": st.request_id})}
        for ref in st.refs:
            d = deltas.setdefault((ref.budget_id, ref.period_start), [0, 0])
            d[0] += held.get(ref.budget_id, 0)
            d[1] += st.actual_nusd
    # Reservations: which rows each request needs.
    wants: dict[tuple[int, datetime], list[int]] = {}  # row -> indexes of requests holding on it
    budget_of: dict[tuple[int, int], BudgetDef] = {}
    for i, rq in enumerate(reserves):
        for b in rq.budgets:
            row = (b.id, period_start(b.period, rq.now))
            wants.setdefault(row, []).append(i)
            budget_of[(i, b.id)] = b
    held_rows: list[list[tuple[int, datetime]]] = [[] for _ in reserves]
    blocked: list[Blocked | None] = [None] * len(reserves)
    remaining: list[int | None] = [None] * len(reserves)
    for row in sorted(set(deltas) | set(wants)):
        key = {"b": row[0], "ps": row[1]}
        ensured = row not in wants  # a settled row was created by its reservation
        if row in deltas:
            held_sum, actual_sum = deltas[row]
            conn.execute(_SETTLE, {**key, "held": held_sum, "actual": actual_sum})
        for i in wants.get(row, ()):
            if blocked[i] is not None:
                continue
            rq = reserves[i]
            now_row = conn.execute(_HOLD, {**key, "amt": rq.amount_nusd}).first()
            if now_row is None and not ensured:  # the period's first hold on this cap: create its row
                conn.execute(_ENSURE_SPEND, key)
                ensured = True
                now_row = conn.execute(_HOLD, {**key, "amt": rq.amount_nusd}).first()
            if now_row is None:  # the cap would be passed: read why, for the message
                now_row = conn.execute(_HELD, key).one()
                b = budget_of[(i, row[0])]
                blocked[i] = Blocked(b.scope, b.name, b.period, int(now_row.spent_nusd),
                                     int(now_row.reserved_nusd), int(now_row.cap), period_end(b.period, rq.now))
                for earlier in held_rows[i]:  # all or none
                    conn.execute(_SETTLE, {"b": earlier[0], "ps": earlier[1], "held": rq.amount_nusd, "actual": 0})
                held_rows[i] = []
                continue
            left = int(now_row.cap) - int(now_row.spent_nusd) - int(now_row.reserved_nusd)
            remaining[i] = left if remaining[i] is None else min(left, remaining[i] or 0)
            held_rows[i].append(row)
    results: list[ReserveResult] = []
    for i, rq in enumerate(reserves):
        if blocked[i] is not None:
            results.append(ReserveResult((), None, blocked[i]))
            continue
        if rq.amount_nusd:
            for b_id, start in held_rows[i]:
                conn.execute(_RESERVE, {"b": b_id, "ps": start, "rid": rq.request_id, "amt": rq.amount_nusd,
                                        "exp": rq.now + rq.ttl})
        refs = tuple(BudgetRef(b_id, start) for b_id, start in held_rows[i])
        results.append(ReserveResult(refs, remaining[i]))
    return results


class BudgetLedger:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def budget_status(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every budget with its current period's spend, reservations and reset time."""
        now = now or utcnow()
        out = []
        with Session(self.engine) as s:
            for b in s.exec(select(Budget).order_by(Budget.scope, Budget.name)).all():
                start = period_start(b.period, now)
                row = s.get(BudgetSpend, (b.id, start))
                out.append({
                    "scope": b.scope, "name": b.name, "period": b.period, "cap_nusd": b.cap_nusd,
                    "spent_nusd": row.spent_nusd if row else 0, "reserved_nusd": row.reserved_nusd if row else 0,
                    "period_start": start, "resets_at": period_end(b.period, now),
                })
        return out

    def extend_reservations(self, request_ids: Sequence[str], until: datetime) -> None:
        """Keep the holds of requests still running: only a dead instance's reservations expire."""
        rt = Reservation.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            for chunk in iter_chunks(request_ids, 500):
                conn.execute(sa.update(rt).where(rt.c.request_id.in_(chunk)).values(expires_at=until))

    def release_expired(self, now: datetime) -> int:
        """Reservations whose instance died: give their headroom back. Safe to run on every instance."""
        sp = BudgetSpend.__table__  # type: ignore[attr-defined]
        rt = Reservation.__table__  # type: ignore[attr-defined]
        n = 0
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(rt.c.request_id, rt.c.budget_id, rt.c.period_start, rt.c.amount_nusd)
                .where(rt.c.expires_at < now).limit(1000)
            ).all()
            rows = sorted(rows, key=lambda r: (r.budget_id, r.period_start))  # the batches' lock order
            for r in rows:
                d = conn.execute(sa.delete(rt).where(rt.c.request_id == r.request_id, rt.c.budget_id == r.budget_id))
                if d.rowcount == 1:  # whoever deletes it releases it, exactly once
                    conn.execute(
                        sa.update(sp).where(sp.c.budget_id == r.budget_id, sp.c.period_start == r.period_start)
                        .values(reserved_nusd=sp.c.reserved_nusd - r.amount_nusd)
                    )
                    n += 1
        return n


# ON CONFLICT DO NOTHING: PostgreSQL and SQLite >= 3.24 both speak it.
_ENSURE_SPEND = Prepared(
    "INSERT INTO budget_spend (budget_id, period_start, spent_nusd, reserved_nusd) VALUES (:b, :ps, 0, 0) "
    "ON CONFLICT DO NOTHING",
    ("ps",))
_HOLD = Prepared(
    "UPDATE budget_spend SET reserved_nusd = reserved_nusd + :amt "
    "WHERE budget_id = :b AND period_start = :ps "
    "AND spent_nusd + reserved_nusd + :amt <= (SELECT cap_nusd FROM budgets WHERE id = :b) "
    "AND spent_nusd + reserved_nusd < (SELECT cap_nusd FROM budgets WHERE id = :b) "
    "RETURNING spent_nusd, reserved_nusd, (SELECT cap_nusd FROM budgets WHERE id = :b) AS cap",
    ("ps",))
_HELD = Prepared(
    "SELECT s.spent_nusd, s.reserved_nusd, b.cap_nusd AS cap FROM budget_spend s JOIN budgets b ON b.id = s.budget_id "
    "WHERE s.budget_id = :b AND s.period_start = :ps",
    ("ps",))
_RESERVE = Prepared(
    "INSERT INTO reservations (request_id, budget_id, period_start, amount_nusd, expires_at) "
    "VALUES (:rid, :b, :ps, :amt, :exp)",
    ("ps", "exp"))


# RETURNING (as in _HOLD): PostgreSQL, and SQLite >= 3.35.
_UNRESERVE = Prepared("DELETE FROM reservations WHERE request_id = :rid RETURNING budget_id, amount_nusd")
_SETTLE = Prepared(
    "UPDATE budget_spend SET reserved_nusd = reserved_nusd - :held, spent_nusd = spent_nusd + :actual "
    "WHERE budget_id = :b AND period_start = :ps",
    ("ps",))


def iter_chunks(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
