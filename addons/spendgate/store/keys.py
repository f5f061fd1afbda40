"""Users, teams, keys, caps and admin events: what admins change (SQLModel sessions).

Every change bumps `registry_version` in the same transaction, so each gateway's registry
reloads within a poll, and is recorded in `admin_events` with its actor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence

import sqlalchemy as sa
from sqlmodel import Session, select

from spendgate import keys as keyfmt
from spendgate.keys import KeyRecord
from spendgate.money import usd_text
from spendgate.periods import PERIODS
from spendgate.store import Database, NotFound, StoreError, default_actor
from spendgate.store.budgets import BudgetDef
from spendgate.store.models import AdminEvent, ApiKey, Budget, RegistryVersion, Team, User, utcnow

RESERVED_NAMES = frozenset({"unknown", "none"})
SCOPES = ("user", "team", "global")


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


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = db.engine

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
            s.execute(self.db.insert_ignore(Team.__table__, {"name": team, "created_at": now}))  # type: ignore[attr-defined]
            t = s.exec(select(Team).where(Team.name == team)).one()
            team_id = t.id
        s.execute(self.db.insert_ignore(User.__table__, {"name": name, "team_id": team_id, "created_at": now}))  # type: ignore[attr-defined]
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
            raise StoreError(f"{sorted(RESERVED_NAMES)} are reserved "
                             "(metrics use them for requests without a user or team)")
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
            after = {"user": user, "team": team, "models": list(models), "expires_at": expires_at, "rpm": rpm,
                     "byok": byok}
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
            self._event(s, actor, "key.rotate", key_id, None,
                        {"grace_seconds": int(grace.total_seconds()), "old_valid_until": k.prev_valid_until})
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

    def set_budget(self, scope: str, name: str, cap_nusd: int, period: str, actor: str | None = None) -> None:
        with Session(self.engine) as s:
            self._set_budget(s, scope, name, cap_nusd, period, actor or default_actor())
            s.commit()

    def _set_budget(self, s: Session, scope: str, name: str, cap_nusd: int, period: str, actor: str) -> None:
        if scope not in SCOPES:
            raise StoreError(f"scope must be user, team or global (got {scope!r})")
        if period not in PERIODS:
            raise StoreError(f"period must be day, week or month (got {period!r})")
        if cap_nusd < 0:
            raise StoreError("a cap cannot be negative")
        now = utcnow()
        b = s.exec(select(Budget).where(Budget.scope == scope, Budget.name == name)).first()
        before = None if b is None else {"cap_usd": usd_text(b.cap_nusd), "period": b.period}
        if b is None:
            b = Budget(scope=scope, name=name, period=period, cap_nusd=cap_nusd, created_at=now, updated_at=now)
        else:
            b.period, b.cap_nusd, b.updated_at = period, cap_nusd, now
        s.add(b)
        self._bump(s)
        self._event(s, actor, "budget.set", f"{scope}:{name}", before,
                    {"cap_usd": usd_text(cap_nusd), "period": period})

    def load_budgets(self) -> list[BudgetDef]:
        with Session(self.engine) as s:
            return [BudgetDef(b.id, b.scope, b.name, b.period, b.cap_nusd) for b in s.exec(select(Budget)).all()]  # type: ignore[arg-type]

    def delete_budget(self, scope: str, name: str, actor: str | None = None) -> bool:
        """Remove a cap and its spend counters (the audit log keeps the history). False if there was none."""
        with Session(self.engine) as s:
            b = s.exec(select(Budget).where(Budget.scope == scope, Budget.name == name)).first()
            if b is None:
                return False
            s.execute(sa.text("DELETE FROM reservations WHERE budget_id = :b"), {"b": b.id})
            s.execute(sa.text("DELETE FROM budget_spend WHERE budget_id = :b"), {"b": b.id})
            s.delete(b)
            self._bump(s)
            self._event(s, actor or default_actor(), "budget.delete", f"{scope}:{name}",
                        {"cap_usd": usd_text(b.cap_nusd), "period": b.period}, None)
            s.commit()
            return True

    def admin_events(self, since: datetime | None = None, until: datetime | None = None,
                     limit: int = 100) -> list[AdminEvent]:
        with Session(self.engine) as s:
            q = select(AdminEvent)
            if since is not None:
                q = q.where(AdminEvent.at >= since)
            if until is not None:
                q = q.where(AdminEvent.at < until)
            return list(s.exec(q.order_by(AdminEvent.id.desc()).limit(limit)).all())  # type: ignore[union-attr]

    def user_team(self, user: str) -> str | None:
        with Session(self.engine) as s:
            row = s.exec(select(Team.name).join(User, User.team_id == Team.id)  # type: ignore[arg-type]
                         .where(User.name == user)).first()
            return row
