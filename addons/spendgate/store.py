"""The only module that talks SQL: schema upgrades, keys, admin events.

All methods are blocking; the proxy calls them from worker threads, never on the event loop.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from decimal import Decimal
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from spendgate import keys as keyfmt
from spendgate.keys import KeyRecord
from spendgate.models import (
    AdminEvent,
    AlertSent,
    ApiKey,
    AuditRecord,
    Budget,
    BudgetSpend,
    CapturedContent,
    RegistryVersion,
    Reservation,
    Team,
    User,
    utcnow,
)
from spendgate.periods import PERIODS, period_end, period_start

MIGRATIONS = Path(__file__).parent / "migrations"
RESERVED_NAMES = frozenset({"unknown", "none"})


class StoreError(RuntimeError):
    pass


class NotFound(StoreError):
    pass


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # Bounded waits: a database that stops answering must surface as errors (503, alerts), not hangs.
    return sa.create_engine(
        url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=1800, pool_timeout=10,
        connect_args={"connect_timeout": 5, "options": "-c statement_timeout=30000"},
    )


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

    @property
    def ok(self) -> bool:
        return self.blocked is None


@dataclass(frozen=True)
class ReserveRequest:
    request_id: str
    budgets: tuple[BudgetDef, ...]
    amount_nusd: int
    now: datetime
    ttl: timedelta


@dataclass(frozen=True)
class KeyListing:
    key_id: str
    user: str
    team: str | None
    state: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    models: tuple[str, ...]
    rpm: int | None
    byok: bool
    capture_content: bool
    capture_reason: str | None


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    @staticmethod
    def head_revision() -> str | None:
        """The newest migration. Revisions are numbered files in one line, so no need to load Alembic."""
        found = sorted(p.name for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
        return found[-1][:4] if found else None

    def upgrade(self) -> tuple[str | None, str | None]:
        """Apply pending migrations; returns (before, after) revisions."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        before = self.current_revision()
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, self.current_revision()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- keys -----------------------------------------------------------------

    def _bump(self, s: Session) -> None:
        s.execute(sa.update(RegistryVersion).where(RegistryVersion.id == 1).values(version=RegistryVersion.version + 1))  # type: ignore[arg-type]

    def _event(self, s: Session, actor: str, action: str, target: str, before: Any, after: Any) -> None:
        s.add(
            AdminEvent(
                at=utcnow(), actor=actor, action=action, target=target,
                before=None if before is None else json.dumps(before, default=str, sort_keys=True),
                after=None if after is None else json.dumps(after, default=str, sort_keys=True),
            )
        )

    def _user(self, s: Session, name: str, team: str | None) -> User:
        now = utcnow()
        team_id = None
        if team:
            # Insert-if-absent, so two admins creating keys for a new team at once both succeed.
            s.execute(_insert_ignore(Team.__table__, {"name": team, "created_at": now}, self.is_sqlite))  # type: ignore[attr-defined]
            t = s.exec(select(Team).where(Team.name == team)).one()
            team_id = t.id
        s.execute(_insert_ignore(User.__table__, {"name": name, "team_id": team_id, "created_at": now}, self.is_sqlite))  # type: ignore[attr-defined]
        u = s.exec(select(User).where(User.name == name)).one()
        if team is not None and u.team_id != team_id:
            u.team_id = team_id
            s.add(u)
        return u

    def create_key(
        self,
        user: str,
        *,
        team: str | None = None,
        models: Sequence[str] = (),
        expires_at: datetime | None = None,
        rpm: int | None = None,
        byok: bool = False,
        capture_content: bool = False,
        capture_reason: str | None = None,
        actor: str | None = None,
        cap: tuple[int, str] | None = None,
    ) -> tuple[str, str]:
        """Mint a key; returns (key_id, full key). The full key exists only in this return value.

        `cap` (nano-USD, period) sets the user's cap in the same transaction: a gateway that sees
        the key sees its cap, never the key alone.
        """
        if capture_content and not capture_reason:
            raise StoreError("content capture needs a reason (--reason)")
        if user in RESERVED_NAMES or team in RESERVED_NAMES:
            raise StoreError(f"{sorted(RESERVED_NAMES)} are reserved (metrics use them for requests without a user or team)")
        actor = actor or default_actor()
        secret = keyfmt.new_secret()
        now = utcnow()
        with Session(self.engine) as s:
            u = self._user(s, user, team)
            for _ in range(5):
                key_id = keyfmt.new_key_id()
                if s.get(ApiKey, key_id) is None:
                    break
            row = ApiKey(
                key_id=key_id, user_id=u.id, state="active", secret_hash=keyfmt.hash_secret(secret),  # type: ignore[arg-type]
                created_at=now, updated_at=now, expires_at=expires_at, allowed_models=json.dumps(list(models)),
                rpm=rpm, byok=byok, capture_content=capture_content, capture_reason=capture_reason,
            )
            s.add(row)
            self._bump(s)
            after = {"user": user, "team": team, "models": list(models), "expires_at": expires_at, "rpm": rpm, "byok": byok}
            self._event(s, actor, "key.create", key_id, None, after)
            if capture_content:
                self._event(s, actor, "content_capture.on", key_id, {"capture_content": False},
                            {"capture_content": True, "reason": capture_reason})
            if cap is not None:
                self._set_budget(s, "user", user, cap[0], cap[1], actor)
            s.commit()
        return key_id, keyfmt.format_key(key_id, secret)

    def _listing(self, k: ApiKey, u: User, t: Team | None) -> KeyListing:
        return KeyListing(
            key_id=k.key_id, user=u.name, team=t.name if t else None, state=self._effective_state(k),
            created_at=k.created_at, last_used_at=k.last_used_at, expires_at=k.expires_at,
            models=tuple(json.loads(k.allowed_models or "[]")), rpm=k.rpm, byok=k.byok,
            capture_content=k.capture_content, capture_reason=k.capture_reason,
        )

    @staticmethod
    def _effective_state(k: ApiKey) -> str:
        if k.state == "active" and k.expires_at is not None and k.expires_at <= utcnow():
            return "expired"
        return k.state

    def _joined(self, s: Session) -> Any:
        return (
            select(ApiKey, User, Team)
            .join(User, ApiKey.user_id == User.id)  # type: ignore[arg-type]
            .join(Team, User.team_id == Team.id, isouter=True)  # type: ignore[arg-type]
        )

    def list_keys(self) -> list[KeyListing]:
        with Session(self.engine) as s:
            rows = s.exec(self._joined(s).order_by(ApiKey.created_at)).all()
            return [self._listing(k, u, t) for k, u, t in rows]

    def revoke(self, key_id_or_user: str, actor: str | None = None) -> list[str]:
        """Revoke one key, or every active key of a user. Returns the revoked key ids."""
        actor = actor or default_actor()
        now = utcnow()
        with Session(self.engine) as s:
            k = s.get(ApiKey, key_id_or_user)
            if k is not None:
                targets = [k]
            else:
                u = s.exec(select(User).where(User.name == key_id_or_user)).first()
                if u is None:
                    raise NotFound(f"no key id or user named {key_id_or_user!r}; see `spendgate keys list`")
                targets = list(s.exec(select(ApiKey).where(ApiKey.user_id == u.id)).all())
            done = []
            for k in targets:
                if k.state == "revoked":
                    continue
                before = k.state
                k.state, k.revoked_at, k.updated_at = "revoked", now, now
                k.prev_secret_hash, k.prev_valid_until = None, None
                s.add(k)
                self._event(s, actor, "key.revoke", k.key_id, {"state": before}, {"state": "revoked"})
                done.append(k.key_id)
            if done:
                self._bump(s)
            s.commit()
            return done

    def rotate(self, key_id: str, grace: timedelta, actor: str | None = None) -> str:
        """New secret for a key; the old secret keeps working for `grace`."""
        actor = actor or default_actor()
        now = utcnow()
        secret = keyfmt.new_secret()
        with Session(self.engine) as s:
            k = s.get(ApiKey, key_id)
            if k is None:
                raise NotFound(f"no key with id {key_id!r}; see `spendgate keys list`")
            if k.state != "active":
                raise StoreError(f"key {key_id} is {k.state}; only active keys can be rotated")
            if grace > timedelta(0):
                k.prev_secret_hash, k.prev_valid_until = k.secret_hash, now + grace
            else:
                k.prev_secret_hash, k.prev_valid_until = None, None
            k.secret_hash, k.updated_at = keyfmt.hash_secret(secret), now
            s.add(k)
            self._bump(s)
            self._event(s, actor, "key.rotate", key_id, None, {"grace_seconds": int(grace.total_seconds()), "old_valid_until": k.prev_valid_until})
            s.commit()
        return keyfmt.format_key(key_id, secret)

    # -- what the gateway reads -----------------------------------------------

    def registry_version(self) -> int:
        with self.engine.connect() as conn:
            v = conn.execute(sa.text("SELECT version FROM registry_version WHERE id = 1")).scalar()
            return int(v or 0)

    def _record(self, k: ApiKey, u: User, t: Team | None) -> KeyRecord:
        return KeyRecord(
            key_id=k.key_id, user=u.name, team=t.name if t else None, state=k.state,
            secret_hash=k.secret_hash, prev_secret_hash=k.prev_secret_hash, prev_valid_until=k.prev_valid_until,
            expires_at=k.expires_at, allowed_models=tuple(json.loads(k.allowed_models or "[]")), rpm=k.rpm,
            byok=k.byok, capture_content=k.capture_content, capture_reason=k.capture_reason,
        )

    def load_keys(self) -> tuple[int, list[KeyRecord]]:
        """(registry version, every key) read in one transaction so the pair is consistent."""
        with Session(self.engine) as s:
            v = s.exec(select(RegistryVersion.version).where(RegistryVersion.id == 1)).first() or 0
            rows = s.exec(self._joined(s)).all()
            return int(v), [self._record(k, u, t) for k, u, t in rows]

    def load_key(self, key_id: str) -> KeyRecord | None:
        with Session(self.engine) as s:
            row = s.exec(self._joined(s).where(ApiKey.key_id == key_id)).first()
            return None if row is None else self._record(*row)

    def touch_last_used(self, used: dict[str, datetime]) -> None:
        if not used:
            return
        t = ApiKey.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            for key_id, at in used.items():
                conn.execute(
                    sa.update(t)
                    .where(t.c.key_id == key_id, sa.or_(t.c.last_used_at.is_(None), t.c.last_used_at < at))
                    .values(last_used_at=at)
                )

    # -- audit log ------------------------------------------------------------

    def write_audit_batch(
        self,
        inserts: Sequence[dict[str, Any]],
        updates: Sequence[dict[str, Any]],
        contents: Sequence[dict[str, Any]] = (),
        settles: Sequence[dict[str, Any]] = (),
        reserves: Sequence[ReserveRequest] = (),
    ) -> list[ReserveResult]:
        """One transaction for a whole batch (group commit). Updates name their row by `id`.

        Budget settlements ride in the same transaction as the audit completions they belong to,
        and reservations of requests about to go upstream share it too (returned in order).
        """
        with self.engine.begin() as conn:
            if inserts:
                conn.execute(_AUDIT_INSERT, [_audit_defaults(r) for r in inserts])
            by_cols: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for u in updates:
                by_cols.setdefault(tuple(sorted(u)), []).append(u)
            for cols, rows in by_cols.items():
                conn.execute(_audit_update(cols), rows)
            if contents:
                conn.execute(sa.insert(CapturedContent.__table__), list(contents))  # type: ignore[attr-defined]
            if settles or reserves:
                return self._budget_ops(conn, settles, reserves)
        return []

    def mark_stale_incomplete(self, older_than: datetime) -> int:
        """Rows a dead gateway left open: say so, so nobody mistakes them for in-flight requests."""
        table = AuditRecord.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(table)
                .where(table.c.outcome == "incomplete", table.c.ended_at.is_(None), table.c.started_at < older_than,
                       table.c.error.is_(None))
                .values(error="gateway stopped before the request ended")
            )
            return int(r.rowcount or 0)

    def mark_instance_incomplete(self, instance_id: str) -> int:
        table = AuditRecord.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(table)
                .where(table.c.outcome == "incomplete", table.c.instance_id == instance_id, table.c.ended_at.is_(None))
                .values(error="gateway stopped before the request ended")
            )
            return int(r.rowcount or 0)

    def purge_content(self, older_than: datetime) -> int:
        t = CapturedContent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(sa.delete(t).where(t.c.captured_at < older_than))
            return int(r.rowcount or 0)

    def audit_rows(
        self,
        *,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        outcome: str | None = None,
        limit: int | None = 100,
    ) -> list[AuditRecord]:
        with Session(self.engine) as s:
            q = select(AuditRecord)
            if user:
                q = q.where(AuditRecord.user == user)
            if since:
                q = q.where(AuditRecord.started_at >= since)
            if until:
                q = q.where(AuditRecord.started_at < until)
            if outcome:
                q = q.where(AuditRecord.outcome == outcome)
            q = q.order_by(AuditRecord.started_at.desc(), AuditRecord.id)  # type: ignore[attr-defined]
            if limit:
                q = q.limit(limit)
            return list(s.exec(q).all())

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
            sa.func.sum(sa.case((t.c.cost_nusd.is_(None) & (t.c.input_tokens + t.c.output_tokens > 0), 1), else_=0)).label("unpriced"),
        )
        if since:
            q = q.where(t.c.started_at >= since.astimezone(timezone.utc))
        if until:
            q = q.where(t.c.started_at < until.astimezone(timezone.utc))
        q = q.group_by(key).order_by(key)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def captured_content(self, request_id: str) -> CapturedContent | None:
        with Session(self.engine) as s:
            return s.get(CapturedContent, request_id)

    # -- budgets --------------------------------------------------------------

    def set_budget(self, scope: str, name: str, cap_nusd: int, period: str, actor: str | None = None) -> None:
        with Session(self.engine) as s:
            self._set_budget(s, scope, name, cap_nusd, period, actor or default_actor())
            s.commit()

    def _set_budget(self, s: Session, scope: str, name: str, cap_nusd: int, period: str, actor: str) -> None:
        if scope not in ("user", "team", "global"):
            raise StoreError(f"scope must be user, team or global (got {scope!r})")
        if period not in PERIODS:
            raise StoreError(f"period must be day, week or month (got {period!r})")
        if cap_nusd < 0:
            raise StoreError("a cap cannot be negative")
        now = utcnow()
        b = s.exec(select(Budget).where(Budget.scope == scope, Budget.name == name)).first()
        before = None if b is None else {"cap_usd": _usd(b.cap_nusd), "period": b.period}
        if b is None:
            b = Budget(scope=scope, name=name, period=period, cap_nusd=cap_nusd, created_at=now, updated_at=now)
        else:
            b.period, b.cap_nusd, b.updated_at = period, cap_nusd, now
        s.add(b)
        self._bump(s)
        self._event(s, actor, "budget.set", f"{scope}:{name}", before, {"cap_usd": _usd(cap_nusd), "period": period})

    def load_budgets(self) -> list[BudgetDef]:
        with Session(self.engine) as s:
            return [BudgetDef(b.id, b.scope, b.name, b.period, b.cap_nusd) for b in s.exec(select(Budget)).all()]  # type: ignore[arg-type]

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

    def reserve(
        self, request_id: str, budgets: Sequence[BudgetDef], amount_nusd: int, now: datetime, ttl: timedelta
    ) -> ReserveResult:
        """Hold `amount_nusd` against every budget, all or none, in one transaction of its own.

        The gateway batches reservations with the audit writes instead (`write_audit_batch`).
        """
        with self.engine.begin() as conn:
            return self._budget_ops(conn, [], [ReserveRequest(request_id, tuple(budgets), amount_nusd, now, ttl)])[0]

    def _budget_ops(
        self, conn: Any, settles: Sequence[dict[str, Any]], reserves: Sequence[ReserveRequest]
    ) -> list[ReserveResult]:
        """Settlements and reservations of one batch, in one pass over the budget rows.

        Each hold is one conditional UPDATE (spent + reserved + amount <= cap), so concurrent
        requests on any number of gateway instances can never jointly pass a cap. Rows are
        visited in (budget, period) order, so two instances' batches cannot deadlock on
        PostgreSQL. A request refused by one of its caps gives back the holds it already took
        (rows this transaction has locked), so a reservation is all or none.
        Plain SQL text: this runs for every capped request.
        """
        # Settlements: replace reservations by actual cost (0 when the request failed).
        deltas: dict[tuple[int, datetime], list[int]] = {}  # (budget, period) -> [held, actual]
        for st in settles:
            held = {int(r.budget_id): int(r.amount_nusd) for r in conn.execute(_HELD_BY, {"rid": st["request_id"]})}
            if held:
                conn.execute(_UNRESERVE, {"rid": st["request_id"]})
            for ref in st["refs"]:
                d = deltas.setdefault((ref.budget_id, ref.period_start), [0, 0])
                d[0] += held.get(ref.budget_id, 0)
                d[1] += st["actual_nusd"]
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
            conn.execute(_ENSURE_SPEND, key)
            if row in deltas:
                held_sum, actual_sum = deltas[row]
                conn.execute(_SETTLE, {**key, "held": held_sum, "actual": actual_sum})
            for i in wants.get(row, ()):
                if blocked[i] is not None:
                    continue
                rq = reserves[i]
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

    # -- admin events ---------------------------------------------------------

    def admin_events(self, since: datetime | None = None, until: datetime | None = None, limit: int = 100) -> list[AdminEvent]:
        with Session(self.engine) as s:
            q = select(AdminEvent)
            if since is not None:
                q = q.where(AdminEvent.at >= since)
            if until is not None:
                q = q.where(AdminEvent.at < until)
            return list(s.exec(q.order_by(AdminEvent.id.desc()).limit(limit)).all())  # type: ignore[union-attr]

    # -- alerts ---------------------------------------------------------------

    def claim_alert(
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
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt: Any = sqlite_insert(t).values(values).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(t).values(values).on_conflict_do_nothing()
        with self.engine.begin() as conn:
            # RETURNING, not rowcount: psycopg reports no rowcount for INSERT .. ON CONFLICT DO NOTHING
            return conn.execute(stmt.returning(t.c.dedupe_key)).first() is not None

    def bump_alert_count(self, dedupe_key: str, n: int = 1, now: datetime | None = None) -> bool:
        """One more occurrence of an already-sent alert (counted, summarised later, not re-sent)."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(sa.update(t).where(t.c.dedupe_key == dedupe_key)
                             .values(count=t.c.count + n, last_at=now or utcnow()))
            return r.rowcount == 1

    def mark_alert(self, dedupe_key: str, status: str, error: str | None = None) -> None:
        """Delivery result: delivered | failed."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.dedupe_key == dedupe_key)
                         .values(status=status, error=None if error is None else error[:2000]))

    def get_alert(self, dedupe_key: str) -> AlertSent | None:
        with Session(self.engine) as s:
            return s.get(AlertSent, dedupe_key)

    def list_alerts(self, kind: str | None = None, since: datetime | None = None, limit: int | None = 100) -> list[AlertSent]:
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

    def latest_alert(self, kind: str, scope: str, name: str) -> AlertSent | None:
        with Session(self.engine) as s:
            q = (select(AlertSent).where(AlertSent.kind == kind, AlertSent.scope == scope, AlertSent.name == name)
                 .order_by(AlertSent.last_at.desc()).limit(1))  # type: ignore[attr-defined]
            return s.exec(q).first()

    def count_alerts(self, kind: str, scope: str, name: str) -> int:
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t)
                                    .where(t.c.kind == kind, t.c.scope == scope, t.c.name == name)).scalar() or 0)

    def unreported_alerts(self, kind: str, since: datetime) -> list[AlertSent]:
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

    def retryable_alerts(self, now: datetime, max_attempts: int, backoff: timedelta, stale: timedelta) -> list[AlertSent]:
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

    def reclaim_alert(self, dedupe_key: str, status: str, attempts: int, now: datetime | None = None) -> bool:
        """Take a failed (or stale) alert for another delivery attempt; exactly one instance wins."""
        t = AlertSent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.update(t).where(t.c.dedupe_key == dedupe_key, t.c.status == status, t.c.attempts == attempts)
                .values(status="sending", attempts=t.c.attempts + 1, last_at=now or utcnow())
            )
            return r.rowcount == 1

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
                "spent_nusd": int(r.spent_nusd), "period_start": starts[r.period], "resets_at": period_end(r.period, now),
            } for r in conn.execute(q)]

    def user_team(self, user: str) -> str | None:
        with Session(self.engine) as s:
            row = s.exec(select(Team.name).join(User, User.team_id == Team.id)  # type: ignore[arg-type]
                         .where(User.name == user)).first()
            return row


_AUDIT_DEFAULTS: dict[str, Any] = {
    "ended_at": None, "user": None, "team": None, "key_id": None, "model_requested": None, "model_reported": None,
    "stream": False, "status_code": None, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
    "cache_write_tokens": 0, "reasoning_tokens": 0, "usage_source": None, "cost_nusd": None, "latency_ms": None,
    "ttft_ms": None, "request_bytes": 0, "response_bytes": 0, "client_addr": None, "user_agent": None,
    "upstream_request_id": None, "error": None, "content_captured": False, "instance_id": None, "cut_fields": None,
}


def _audit_defaults(row: dict[str, Any]) -> dict[str, Any]:
    # executemany needs every row to carry the same keys
    return {**_AUDIT_DEFAULTS, **row}


def _insert_ignore(table: Any, values: dict[str, Any], sqlite: bool) -> Any:
    if sqlite:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).values(values).on_conflict_do_nothing()
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    return pg_insert(table).values(values).on_conflict_do_nothing()


def _ts_param(name: str) -> Any:
    from spendgate.models import UTCDateTime

    return sa.bindparam(name, type_=UTCDateTime())


_AUDIT_COLUMNS = ("id", "started_at", "provider", "host", "method", "path", "endpoint_kind", "outcome", *_AUDIT_DEFAULTS)
_AUDIT_TS = ("started_at", "ended_at")


def _audit_stmt(sql: str, cols: Sequence[str]) -> Any:
    return sa.text(sql).bindparams(*[_ts_param(c) for c in _AUDIT_TS if c in cols])


# Prepared text: these run for every request and SQL construction would cost more than the commit.
# Column names are quoted: `user` is reserved in PostgreSQL.
_AUDIT_INSERT = _audit_stmt(
    "INSERT INTO audit_log (" + ", ".join(f'"{c}"' for c in _AUDIT_COLUMNS) + ") VALUES ("
    + ", ".join(f":{c}" for c in _AUDIT_COLUMNS) + ")",
    _AUDIT_COLUMNS,
)
_AUDIT_UPDATES: dict[tuple[str, ...], Any] = {}


def _audit_update(cols: tuple[str, ...]) -> Any:
    stmt = _AUDIT_UPDATES.get(cols)
    if stmt is None:
        unknown = set(cols) - set(_AUDIT_COLUMNS)
        if unknown:
            raise StoreError(f"not audit columns: {sorted(unknown)}")
        sets = ", ".join(f'"{c}" = :{c}' for c in cols if c != "id")
        stmt = _AUDIT_UPDATES[cols] = _audit_stmt(f"UPDATE audit_log SET {sets} WHERE id = :id", cols)
    return stmt


# ON CONFLICT DO NOTHING: PostgreSQL and SQLite >= 3.24 both speak it.
_ENSURE_SPEND = sa.text(
    "INSERT INTO budget_spend (budget_id, period_start, spent_nusd, reserved_nusd) VALUES (:b, :ps, 0, 0) "
    "ON CONFLICT DO NOTHING"
).bindparams(_ts_param("ps"))
_HOLD = sa.text(
    "UPDATE budget_spend SET reserved_nusd = reserved_nusd + :amt "
    "WHERE budget_id = :b AND period_start = :ps "
    "AND spent_nusd + reserved_nusd + :amt <= (SELECT cap_nusd FROM budgets WHERE id = :b) "
    "AND spent_nusd + reserved_nusd < (SELECT cap_nusd FROM budgets WHERE id = :b) "
    "RETURNING spent_nusd, reserved_nusd, (SELECT cap_nusd FROM budgets WHERE id = :b) AS cap"
).bindparams(_ts_param("ps"))
_HELD = sa.text(
    "SELECT s.spent_nusd, s.reserved_nusd, b.cap_nusd AS cap FROM budget_spend s JOIN budgets b ON b.id = s.budget_id "
    "WHERE s.budget_id = :b AND s.period_start = :ps"
).bindparams(_ts_param("ps"))
_RESERVE = sa.text(
    "INSERT INTO reservations (request_id, budget_id, period_start, amount_nusd, expires_at) "
    "VALUES (:rid, :b, :ps, :amt, :exp)"
).bindparams(_ts_param("ps"), _ts_param("exp"))


_HELD_BY = sa.text("SELECT budget_id, amount_nusd FROM reservations WHERE request_id = :rid")
_UNRESERVE = sa.text("DELETE FROM reservations WHERE request_id = :rid")
_SETTLE = sa.text(
    "UPDATE budget_spend SET reserved_nusd = reserved_nusd - :held, spent_nusd = spent_nusd + :actual "
    "WHERE budget_id = :b AND period_start = :ps"
).bindparams(_ts_param("ps"))


def _usd(nano: int) -> str:
    return str((Decimal(nano) / Decimal(1_000_000_000)).normalize())


def iter_chunks(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
