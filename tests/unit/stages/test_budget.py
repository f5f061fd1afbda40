"""The Budgets stage driven with mitmproxy test flows: estimates, atomic reservations on a real
store (SQLite, and PostgreSQL when reachable) through the real audit writer, period boundaries
with a fake clock, and the refusal a developer sees."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mitmproxy import http
from mitmproxy.test import tflow

from spendgate.money import usd_text
from spendgate.pricing import PriceOverride, Pricer
from spendgate.settings import parse_settings
from spendgate.stages.budget import REMAINING_HEADER, BudgetAdmission, Budgets, CapRules
from spendgate.stages.call import META, Call, Outcome, new_request_id
from spendgate.stages.estimate import Estimator
from spendgate.stages.policy import Policy
from spendgate.stages.record import Record
from spendgate.store import Database
from spendgate.store import budgets as ledger_sql
from spendgate.store.budgets import BudgetLedger, Settlement
from spendgate.store.keys import KeyStore
from spendgate.store.maintenance import LiveHolds
from spendgate.store.registry import KeyRegistry
from spendgate.store.writer import AuditWriter

UTC = timezone.utc
TTL = timedelta(seconds=600)
CENT = 10_000_000  # nano-USD
CAP = 10 * CENT  # $0.10


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


# The last instant of a period and the first of the next, per period kind.
BOUNDARIES = [
    pytest.param("day", utc(2026, 4, 1), id="day"),
    pytest.param("week", utc(2026, 3, 30), id="week-sunday-to-monday"),
    pytest.param("month", utc(2026, 2, 1), id="month"),
    pytest.param("month", utc(2028, 3, 1), id="month-leap-february"),
]
KEEP_TABLES = {"alembic_version", "registry_version"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        d = Database(f"sqlite:///{tmp_path / 'budgets.db'}")
        d.upgrade()
    else:
        d = Database(request.getfixturevalue("pg_module_url"))
        with d.engine.begin() as conn:
            tables = [r[0] for r in conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")) if r[0] not in KEEP_TABLES]
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    yield d
    d.close()


def status(db: Database, now: datetime, scope: str, name: str) -> dict[str, Any]:
    return next(r for r in BudgetLedger(db).budget_status(now) if (r["scope"], r["name"]) == (scope, name))


# ----------------------------------------------------------------------------- the Budgets stage


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# $0.0001 per input token, $0.01 per output token: the output limit dominates the estimate.
PRICES = {"openai:gpt-4o": PriceOverride.parse({"input": 100, "output": 10000})}


class Stage:
    """The caps stage's two halves on a real store and key registry, with a fake clock, around the
    real `Record`: as in the gateway, the reservation is taken in the commit of the audit row."""

    def __init__(self, db: Database, now: datetime, default_max_output_tokens: int = 20, clamp: bool = False) -> None:
        self.db = db
        self.store = KeyStore(db)
        self.settings = parse_settings({"budgets": {"default_max_output_tokens": default_max_output_tokens}},
                                       {"OPENAI_API_KEY": "upstream-test"})
        self.registry = KeyRegistry(self.store)
        self.writer = AuditWriter(db)  # reservations commit through the audit writer, as in the gateway
        self.writer.start()
        self.clock = FakeClock(now)
        b = self.settings.budgets
        self.budgets = Budgets(self.registry.budgets_for, self.writer.reserve, LiveHolds().add, Pricer(PRICES),
                               Estimator(b.default_max_output_tokens),
                               CapRules(TTL, b.fail_closed, clamp_output=clamp, min_output_tokens=5), clock=self.clock)
        self.policy = Policy(self.settings.proxy.max_request_bytes)
        self.record = Record(self.writer, "test", False, True, LiveHolds().discard)

    async def admit(self, f: http.HTTPFlow) -> None:
        """Budgets, Record and BudgetAdmission, as the pipeline runs them on a request."""
        for stage in (self.budgets.request, self.record.request, BudgetAdmission(self.budgets).request):
            if f.response is not None:
                return
            await stage(f)

    def key(self, user: str, team: str | None = None) -> Any:
        key_id, _ = self.store.create_key(user, team=team, actor="test")
        self.registry.refresh()
        return self.registry.get(key_id)

    def request(self, key: Any, body: dict[str, Any]) -> http.HTTPFlow:
        self.registry.refresh()  # budgets set since the last call
        f = tflow.tflow()
        f.request.method, f.request.host, f.request.path = "POST", "api.openai.com", "/v1/chat/completions"
        f.request.content = json.dumps(body).encode()
        f.metadata[META] = Call(request_id=new_request_id(), provider=self.settings.provider("openai"),
                                host="api.openai.com", key=key)
        asyncio.run(self.policy.request(f))
        if f.response is None:  # (a request the policy stage refuses never reaches the budget stage)
            asyncio.run(self.admit(f))
        return f

    def finish(self, f: http.HTTPFlow, actual_nusd: int) -> None:
        """What the writer does when the request ends: the settlement, in a transaction."""
        call = f.metadata[META]
        with self.db.transaction() as conn:
            ledger_sql.apply(conn, [Settlement(call.request_id, call.hold.refs, actual_nusd)], [])


def chat(max_tokens: int | None = None, text: str = "hi") -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def usd(nano: int) -> Decimal:
    return Decimal(usd_text(nano, places=6))


def spent_and_cap(message: str) -> tuple[Decimal, Decimal]:
    m = re.search(r"spent \$([0-9.]+) of \$([0-9.]+)", message)
    assert m, message
    return Decimal(m.group(1)).quantize(Decimal("0.000001")), Decimal(m.group(2)).quantize(Decimal("0.000001"))


def error_of(f: http.HTTPFlow) -> dict[str, Any]:
    assert f.response is not None
    doc = json.loads(f.response.content or b"")
    assert isinstance(doc, dict)
    return doc["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("period,boundary", BOUNDARIES)
def test_stage_blocks_until_the_period_turns(db: Database, period: str, boundary: datetime) -> None:
    st = Stage(db, boundary - timedelta(seconds=90))
    st.store.set_budget("user", "alice", CAP, period, actor="test")
    key = st.key("alice")

    first = st.request(key, chat(max_tokens=6))
    call = first.metadata[META]
    assert first.response is None and call.outcome is None
    estimate = call.hold.estimate_nusd
    assert 6 * CENT <= estimate < 7 * CENT  # 6 output tokens at $0.01 plus a few prompt tokens
    first.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    st.budgets.responseheaders(first)
    assert Decimal(first.response.headers[REMAINING_HEADER]) == usd(CAP - estimate)
    st.finish(first, estimate - 10_000)

    second = st.request(key, chat(max_tokens=6))
    assert second.response is not None and second.response.status_code == 429
    assert second.metadata[META].outcome is Outcome.BLOCKED_CAP
    assert second.response.headers["retry-after"] == "90"  # exactly the seconds to the boundary
    err = error_of(second)
    assert err["code"] == "spendgate_budget_exceeded"
    for part in ("user alice", "cap", period, boundary.isoformat()):
        assert part in err["message"], (part, err["message"])
    assert spent_and_cap(err["message"]) == (usd(estimate - 10_000), usd(CAP))

    st.clock.now = boundary  # the clock turns; nothing was slept
    third = st.request(key, chat(max_tokens=6))
    assert third.response is None and third.metadata[META].hold.refs
    assert status(db, boundary, "user", "alice")["reserved_nusd"] == third.metadata[META].hold.estimate_nusd


def test_stage_uses_the_default_output_limit_when_the_request_has_none(db: Database) -> None:
    st = Stage(db, utc(2026, 7, 1, 12), default_max_output_tokens=20)
    st.store.set_budget("user", "carol", CAP, "day", actor="test")
    key = st.key("carol")
    f = st.request(key, chat(max_tokens=None))  # estimate: 20 output tokens = $0.20 > $0.10
    assert f.response is not None and f.response.status_code == 429
    assert "would be passed by this request (estimated $0.2" in error_of(f)["message"]
    assert status(db, st.clock.now, "user", "carol")["reserved_nusd"] == 0
    assert st.request(key, chat(max_tokens=9)).response is None


def test_stage_team_and_global_caps_bind_without_a_user_cap(db: Database) -> None:
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("team", "core", 15 * CENT, "week", actor="test")
    st.store.set_budget("global", "global", 20 * CENT, "month", actor="test")
    dave, erin, frank = st.key("dave", team="core"), st.key("erin", team="core"), st.key("frank")
    assert st.request(dave, chat(max_tokens=8)).response is None
    blocked = st.request(erin, chat(max_tokens=8))
    assert blocked.response is not None and blocked.response.status_code == 429
    assert "team core" in error_of(blocked)["message"]
    assert st.request(frank, chat(max_tokens=8)).response is None
    blocked = st.request(frank, chat(max_tokens=8))
    assert blocked.response is not None and "global" in error_of(blocked)["message"]
    assert int(blocked.response.headers["retry-after"]) == int((utc(2026, 8, 1) - st.clock.now).total_seconds())


def test_stage_negative_output_limit_does_not_create_headroom(db: Database) -> None:
    """max_tokens = -100000 would price the request at -$1000: held while it is in flight, such a
    "reservation" would free room under the cap for any number of real requests."""
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("user", "mallory", CAP, "day", actor="test")
    key = st.key("mallory")
    st.request(key, chat(max_tokens=-100_000))  # refused or reserved at >= 0, either way no headroom
    assert status(db, st.clock.now, "user", "mallory")["reserved_nusd"] >= 0
    assert st.request(key, chat(max_tokens=6)).response is None
    blocked = st.request(key, chat(max_tokens=6))  # $0.12 in flight would pass the $0.10 cap
    assert blocked.response is not None and blocked.response.status_code == 429


def test_stage_absurd_output_limit_is_a_cap_refusal_not_a_store_failure(db: Database) -> None:
    """max_tokens = 10**15 estimates at $10**10: more than any cap, so 429 — not a 503
    "cannot check your budget, try again" from an integer overflow in the database (SQLite)."""
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("user", "bigspender", CAP, "day", actor="test")
    key = st.key("bigspender")
    f = st.request(key, chat(max_tokens=10**15))
    assert f.response is not None
    assert (f.response.status_code, error_of(f)["code"]) == (429, "spendgate_budget_exceeded")


def test_a_small_request_far_from_its_cap_holds_an_upper_bound_without_counting(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a $100 cap a chat bounded at ~$0.07 is held at the bound: a token is at least one
    byte, so the prompt is at most the body's size. Near the cap it is counted exactly."""
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("user", "erin", 1000 * CAP, "day", actor="test")
    key = st.key("erin")
    body = chat(max_tokens=6, text="hello " * 20)
    import spendgate.stages.estimate as estimate

    def no_counting(*a: Any, **kw: Any) -> int:
        raise AssertionError("counted a prompt far from every cap")

    monkeypatch.setattr(estimate, "estimate_input_tokens", no_counting)
    f = st.request(key, body)
    hold = f.metadata[META].hold
    size = len(json.dumps(body).encode())
    assert f.response is None and hold.estimate_nusd == (size + 64) * 100_000 + 6 * CENT  # $100 / $10,000 per 1M
    monkeypatch.undo()
    st.finish(f, 0)
    st.store.set_budget("user", "erin", CAP, "day", actor="test")  # now the bound is no small share
    g = st.request(key, body)
    exact = g.metadata[META].hold.estimate_nusd
    assert g.response is None and 6 * CENT < exact < hold.estimate_nusd


def test_a_capped_request_is_held_in_the_commit_of_its_audit_row(db: Database) -> None:
    """One round trip to the store before the request may go: its write-ahead audit row, its rate
    count and its reservation in one transaction (the writer's batches), not one commit each."""
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("user", "gina", CAP, "day", actor="test")
    key = st.key("gina")
    before = st.writer.stats.batches
    f = st.request(key, chat(max_tokens=6))
    call = f.metadata[META]
    assert f.response is None and call.audit.begun and call.hold.refs
    assert st.writer.stats.batches - before == 1
    assert status(db, st.clock.now, "user", "gina")["reserved_nusd"] == call.hold.estimate_nusd
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT outcome FROM audit_log WHERE id = :i"),
                            {"i": call.request_id}).scalar() == "incomplete"
    blocked = st.request(key, chat(max_tokens=6))  # $0.12 in flight would pass the cap: refused after its row
    assert blocked.response is not None and blocked.metadata[META].outcome is Outcome.BLOCKED_CAP
    assert blocked.metadata[META].audit.begun and blocked.metadata[META].hold is None
    assert status(db, st.clock.now, "user", "gina")["reserved_nusd"] == call.hold.estimate_nusd


def test_a_request_over_its_rate_limit_holds_nothing(db: Database) -> None:
    """The rate count and the reservation share a commit: a request the limit refuses must not
    leave a hold behind it (nobody would settle it before it expired)."""
    st = Stage(db, utc(2026, 7, 1, 12))
    st.store.set_budget("user", "hank", CAP, "day", actor="test")
    key_id, _ = st.store.create_key("hank", rpm=1, actor="test")
    st.registry.refresh()
    key = st.registry.get(key_id)
    first = st.request(key, chat(max_tokens=1))
    assert first.response is None
    held = status(db, st.clock.now, "user", "hank")["reserved_nusd"]
    assert held == first.metadata[META].hold.estimate_nusd > 0
    second = st.request(key, chat(max_tokens=1))
    assert second.response is not None and second.metadata[META].outcome is Outcome.BLOCKED_RATE
    assert second.metadata[META].hold is None
    assert status(db, st.clock.now, "user", "hank")["reserved_nusd"] == held
