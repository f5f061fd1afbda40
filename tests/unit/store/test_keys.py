"""spendgate.store.keys: what admins change. A key and its cap are created in one transaction, revoking
and rotating keep (or end) the right secrets, and every change is an admin event and a registry
version bump (SQLite, and PostgreSQL when reachable)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event as sa_event

from spendgate.keys import parse_key
from spendgate.store import Database, NotFound, StoreError
from spendgate.store.keys import KeyStore
from spendgate.store.models import utcnow

NANO = 1_000_000_000


def secret_of(full_key: str) -> str:
    parsed = parse_key(full_key)
    assert parsed is not None
    return parsed.secret


def events(keys: KeyStore) -> list[tuple[str, str, Any, Any]]:
    """(action, target, before, after), oldest first."""
    return [(e.action, e.target, e.before and json.loads(e.before), e.after and json.loads(e.after))
            for e in reversed(keys.admin_events())]


def count_commits(db: Database) -> list[int]:
    commits = [0]

    def on_commit(conn: Any) -> None:
        commits[0] += 1

    sa_event.listen(db.engine, "commit", on_commit)
    return commits


def test_a_key_and_its_cap_are_created_in_one_transaction(db: Database) -> None:
    keys = KeyStore(db)
    version = keys.registry_version()
    commits = count_commits(db)
    key_id, full = keys.create_key("alice", team="core", actor="admin", cap=(5 * NANO, "week"))
    assert commits[0] == 1  # a gateway polling the registry never sees the key without its cap
    (budget,) = keys.load_budgets()
    assert (budget.scope, budget.name, budget.cap_nusd, budget.period) == ("user", "alice", 5 * NANO, "week")
    v, records = keys.load_keys()
    assert v > version
    (rec,) = records
    assert (rec.key_id, rec.user, rec.team, rec.state) == (key_id, "alice", "core", "active")
    assert rec.matches(secret_of(full), utcnow())
    assert [(a, t) for a, t, _, _ in events(keys)] == [("key.create", key_id), ("budget.set", "user:alice")]
    assert events(keys)[1][3] == {"cap_usd": "5", "period": "week"}


def test_a_bad_cap_creates_no_key(db: Database) -> None:
    keys = KeyStore(db)
    with pytest.raises(StoreError, match="period"):
        keys.create_key("bob", actor="admin", cap=(NANO, "fortnight"))
    assert keys.load_keys()[1] == [] and keys.load_budgets() == [] and keys.admin_events() == []


@pytest.mark.parametrize(("kw", "error"), [
    ({"capture_content": True}, "reason"),
    ({"user": "unknown"}, "reserved"),
    ({"team": "none"}, "reserved"),
])
def test_create_key_refuses(db: Database, kw: dict[str, Any], error: str) -> None:
    keys = KeyStore(db)
    kw = dict(kw)
    with pytest.raises(StoreError, match=error):
        keys.create_key(kw.pop("user", "carol"), actor="admin", **kw)
    assert keys.load_keys()[1] == []


def test_content_capture_is_recorded_with_its_reason(db: Database) -> None:
    keys = KeyStore(db)
    key_id, _ = keys.create_key("dora", capture_content=True, capture_reason="incident 42", actor="admin")
    assert events(keys)[-1] == ("content_capture.on", key_id, {"capture_content": False},
                                {"capture_content": True, "reason": "incident 42"})
    (listing,) = keys.list_keys()
    assert listing.capture_content and listing.capture_reason == "incident 42"


def test_revoke_one_key_or_every_key_of_a_user(db: Database) -> None:
    keys = KeyStore(db)
    k1, _ = keys.create_key("erin", actor="admin")
    k2, _ = keys.create_key("erin", actor="admin")
    k3, _ = keys.create_key("frank", actor="admin")
    version = keys.registry_version()
    assert keys.revoke(k1, actor="admin") == [k1]
    assert keys.registry_version() > version
    assert sorted(keys.revoke("erin", actor="admin")) == [k2]  # k1 is already revoked
    assert keys.revoke("erin", actor="admin") == []
    states = {r.key_id: r.state for r in keys.load_keys()[1]}
    assert states == {k1: "revoked", k2: "revoked", k3: "active"}
    revokes = [(t, before, after) for a, t, before, after in events(keys) if a == "key.revoke"]
    assert revokes == [(k1, {"state": "active"}, {"state": "revoked"}), (k2, {"state": "active"}, {"state": "revoked"})]
    with pytest.raises(NotFound):
        keys.revoke("nobody", actor="admin")


def test_rotate_keeps_the_old_secret_for_the_grace_period_only(db: Database) -> None:
    keys = KeyStore(db)
    key_id, old = keys.create_key("gina", actor="admin")
    new = keys.rotate(key_id, timedelta(hours=1), actor="admin")
    assert new.startswith(f"sg_{key_id}_") and new != old
    (rec,) = keys.load_keys()[1]
    now = utcnow()
    assert rec.matches(secret_of(new), now)
    assert rec.matches(secret_of(old), now)
    assert not rec.matches(secret_of(old), now + timedelta(hours=1, seconds=1))
    assert events(keys)[-1][:2] == ("key.rotate", key_id) and events(keys)[-1][3]["grace_seconds"] == 3600
    # Without grace, and then after a revoke: the old secrets stop at once, and a revoked key stays so.
    newer = keys.rotate(key_id, timedelta(0), actor="admin")
    (rec,) = keys.load_keys()[1]
    assert rec.matches(secret_of(newer), now) and not rec.matches(secret_of(new), now)
    keys.revoke(key_id, actor="admin")
    (rec,) = keys.load_keys()[1]
    assert rec.prev_secret_hash is None
    with pytest.raises(StoreError, match="revoked"):
        keys.rotate(key_id, timedelta(hours=1), actor="admin")
    with pytest.raises(NotFound):
        keys.rotate("zzzzzzzz", timedelta(hours=1), actor="admin")


def test_set_and_delete_a_budget_are_admin_events(db: Database) -> None:
    keys = KeyStore(db)
    keys.set_budget("team", "core", 100 * NANO, "month", actor="admin")
    keys.set_budget("team", "core", 150 * NANO, "month", actor="admin")
    version = keys.registry_version()
    assert keys.delete_budget("team", "core", actor="ops") is True
    assert keys.registry_version() > version
    assert keys.load_budgets() == []
    assert keys.delete_budget("team", "core", actor="ops") is False
    assert events(keys) == [
        ("budget.set", "team:core", None, {"cap_usd": "100", "period": "month"}),
        ("budget.set", "team:core", {"cap_usd": "100", "period": "month"}, {"cap_usd": "150", "period": "month"}),
        ("budget.delete", "team:core", {"cap_usd": "150", "period": "month"}, None),
    ]
    assert keys.admin_events(limit=1)[0].actor == "ops"


@pytest.mark.parametrize(("scope", "period", "cap", "error"), [
    ("org", "day", NANO, "scope"), ("user", "year", NANO, "period"), ("user", "day", -1, "negative"),
])
def test_set_budget_refuses(db: Database, scope: str, period: str, cap: int, error: str) -> None:
    with pytest.raises(StoreError, match=error):
        KeyStore(db).set_budget(scope, "x", cap, period, actor="admin")


def test_last_used_only_moves_forward_and_users_keep_their_team(db: Database) -> None:
    keys = KeyStore(db)
    key_id, _ = keys.create_key("hana", team="core", actor="admin")
    t = utcnow()
    keys.touch_last_used({key_id: t})
    keys.touch_last_used({key_id: t - timedelta(minutes=5)})
    (listing,) = keys.list_keys()
    assert listing.last_used_at == t
    assert keys.user_team("hana") == "core" and keys.user_team("nobody") is None
