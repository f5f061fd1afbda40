"""Budgets without a proxy: reservations and settlement against a real store (SQLite in tmp_path,
and PostgreSQL when reachable), period boundaries with an injected clock, and the Budgets stage
driven with mitmproxy test flows and a fake clock."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from mitmproxy import http
from mitmproxy.test import tflow
from sqlalchemy import event as sa_event

from spendgate.auditlog import AuditWriter
from spendgate.holds import LiveHolds
from spendgate.budget import REMAINING_HEADER, Budgets
from spendgate.call import META, Call, new_request_id
from spendgate.periods import period_end, period_start
from spendgate.policy import Policy
from spendgate.pricing import PriceOverride, Pricer
from spendgate.registry import KeyRegistry
from spendgate.settings import parse_settings
from spendgate.store import BudgetDef, BudgetRef, Store

UTC = timezone.utc
TTL = timedelta(seconds=600)
CENT = 10_000_000  # nano-USD
CAP = 10 * CENT  # $0.10


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


# The last instant of a period and the first of the next, per period kind.
BOUNDARIES = [
    pytest.param("day", utc(2026, 4, 1), id="day"),
    pytest.param("day", utc(2027, 1, 1), id="day-new-year"),
    pytest.param("week", utc(2026, 3, 30), id="week-sunday-to-monday"),
    pytest.param("week", utc(2027, 1, 4), id="week-across-new-year"),
    pytest.param("month", utc(2026, 2, 1), id="month"),
    pytest.param("month", utc(2028, 3, 1), id="month-leap-february"),
    pytest.param("month", utc(2027, 1, 1), id="month-december"),
]


# ----------------------------------------------------------------------------- fixtures


KEEP_TABLES = {"alembic_version", "registry_version"}


def _empty_pg(s: Store) -> None:
    with s.engine.begin() as conn:
        tables = [r[0] for r in conn.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")) if r[0] not in KEEP_TABLES]
        conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'budgets.db'}")
        s.upgrade()
    else:
        s = Store(request.getfixturevalue("pg_module_url"))
        _empty_pg(s)
    yield s
    s.close()


def make_budget(store: Store, scope: str, name: str, cap_nusd: int, period: str = "day") -> BudgetDef:
    store.set_budget(scope, name, cap_nusd, period, actor="test")
    return next(b for b in store.load_budgets() if (b.scope, b.name) == (scope, name))


def settle(store: Store, *items: tuple[str, tuple[BudgetRef, ...], int]) -> None:
    """What the audit writer does when requests end: settlements in one batch transaction."""
    store.write_audit_batch([], [], (), [{"request_id": rid, "refs": refs, "actual_nusd": actual}
                                         for rid, refs, actual in items])


def status(store: Store, now: datetime, scope: str, name: str) -> dict[str, Any]:
    return next(r for r in store.budget_status(now) if (r["scope"], r["name"]) == (scope, name))


def rid() -> str:
    return new_request_id()


# ----------------------------------------------------------------------------- periods (pure)


@pytest.mark.parametrize("period,boundary", BOUNDARIES)
def test_period_start_and_end_meet_at_the_utc_boundary(period: str, boundary: datetime) -> None:
    last = boundary - timedelta(microseconds=1)
    assert period_end(period, last) == boundary
    assert period_start(period, boundary) == boundary
    assert period_start(period, last) < boundary
    # The same instant written in another time zone is in the same UTC period.
    for tz in (timezone(timedelta(hours=5)), timezone(timedelta(hours=-8))):
        assert period_start(period, last.astimezone(tz)) == period_start(period, last)
        assert period_start(period, boundary.astimezone(tz)) == boundary


# ----------------------------------------------------------------------------- store: reserve / settle


@pytest.mark.parametrize("period,boundary", BOUNDARIES)
def test_period_boundary_resets_the_spend(store: Store, period: str, boundary: datetime) -> None:
    b = make_budget(store, "user", "alice", CAP, period)
    before = boundary - timedelta(seconds=1)

    r1 = rid()
    res = store.reserve(r1, [b], 6 * CENT, before, TTL)
    assert res.ok and res.remaining_nusd == 4 * CENT
    settle(store, (r1, res.refs, 6 * CENT))
    assert status(store, before, "user", "alice")["spent_nusd"] == 6 * CENT

    blocked = store.reserve(rid(), [b], 6 * CENT, before + timedelta(milliseconds=500), TTL)
    assert not blocked.ok and blocked.blocked is not None
    assert blocked.blocked.resets_at == boundary
    assert (blocked.blocked.spent_nusd, blocked.blocked.cap_nusd) == (6 * CENT, CAP)

    # The first instant of the next period (given in a non-UTC zone): the spend starts again from 0.
    r3 = rid()
    after = store.reserve(r3, [b], 6 * CENT, boundary.astimezone(timezone(timedelta(hours=-8))), TTL)
    assert after.ok, after.blocked
    now_status = status(store, boundary, "user", "alice")
    assert (now_status["spent_nusd"], now_status["reserved_nusd"]) == (0, 6 * CENT)
    assert now_status["resets_at"] == period_end(period, boundary) > boundary
    old_status = status(store, before, "user", "alice")
    assert (old_status["spent_nusd"], old_status["reserved_nusd"]) == (6 * CENT, 0)

    # ...and accumulates normally inside the new period.
    settle(store, (r3, after.refs, 5 * CENT))
    again = store.reserve(rid(), [b], 6 * CENT, boundary + timedelta(seconds=1), TTL)
    assert not again.ok and again.blocked is not None and again.blocked.spent_nusd == 5 * CENT


def test_request_across_midnight_is_charged_to_the_day_it_started(store: Store) -> None:
    b = make_budget(store, "user", "night-owl", CAP, "day")
    r1 = rid()
    res = store.reserve(r1, [b], 6 * CENT, utc(2026, 5, 1, 23, 59, 59), TTL)
    assert res.ok
    # Still in flight after midnight: the new day's whole cap is available.
    r2 = rid()
    new_day = store.reserve(r2, [b], CAP, utc(2026, 5, 2, 0, 0, 1), TTL)
    assert new_day.ok, new_day.blocked
    settle(store, (r1, res.refs, 5 * CENT))
    old = status(store, utc(2026, 5, 1, 12), "user", "night-owl")
    new = status(store, utc(2026, 5, 2, 12), "user", "night-owl")
    assert (old["spent_nusd"], old["reserved_nusd"]) == (5 * CENT, 0)
    assert (new["spent_nusd"], new["reserved_nusd"]) == (0, CAP)


def test_reservation_is_all_or_nothing_across_caps(store: Store) -> None:
    now = utc(2026, 6, 10, 12)
    user = make_budget(store, "user", "bob", 100 * CENT)
    team = make_budget(store, "team", "core", 5 * CENT)
    glob = make_budget(store, "global", "global", 1000 * CENT)
    res = store.reserve(rid(), [user, team, glob], 6 * CENT, now, TTL)
    assert res.blocked is not None and (res.blocked.scope, res.blocked.name) == ("team", "core")
    # Nothing stays held on the caps that had room.
    for scope, name in (("user", "bob"), ("team", "core"), ("global", "global")):
        assert status(store, now, scope, name)["reserved_nusd"] == 0
    ok = store.reserve(rid(), [user, team, glob], 5 * CENT, now, TTL)
    assert ok.ok and ok.remaining_nusd == 0  # the tightest cap's headroom
    assert [status(store, now, s, n)["reserved_nusd"] for s, n in
            (("user", "bob"), ("team", "core"), ("global", "global"))] == [5 * CENT] * 3


def test_concurrent_reservations_never_pass_the_cap(store: Store) -> None:
    now = utc(2026, 6, 10, 12)
    b = make_budget(store, "user", "swarm", CAP)
    start = threading.Barrier(40)
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def one() -> None:
        r = rid()
        start.wait()
        res = store.reserve(r, [b], CENT + 1, now, TTL)  # 9 fit in $0.10, the 10th does not
        with lock:
            results.append((r, res))

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    admitted = [(r, res) for r, res in results if res.ok]
    assert len(results) == 40 and len(admitted) == 9
    assert status(store, now, "user", "swarm")["reserved_nusd"] == 9 * (CENT + 1)
    settle(store, *[(r, res.refs, CENT) for r, res in admitted])
    st = status(store, now, "user", "swarm")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (9 * CENT, 0)


def test_expired_reservations_are_released_once(store: Store) -> None:
    t0 = utc(2026, 6, 10, 12)
    user = make_budget(store, "user", "crashy", CAP)
    team = make_budget(store, "team", "ops", CAP)
    r1 = rid()
    res = store.reserve(r1, [user, team], 6 * CENT, t0, timedelta(seconds=3))
    assert res.ok
    assert store.release_expired(t0 + timedelta(seconds=2)) == 0
    assert status(store, t0, "user", "crashy")["reserved_nusd"] == 6 * CENT
    assert store.release_expired(t0 + timedelta(seconds=4)) == 2  # one per cap
    assert store.release_expired(t0 + timedelta(seconds=5)) == 0
    for scope, name in (("user", "crashy"), ("team", "ops")):
        assert status(store, t0, scope, name)["reserved_nusd"] == 0
    # A request that did finish after all (its gateway was only slow): charged, never released twice.
    settle(store, (r1, res.refs, 5 * CENT))
    st = status(store, t0, "user", "crashy")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (5 * CENT, 0)


def test_failed_request_releases_its_reservation(store: Store) -> None:
    now = utc(2026, 6, 10, 12)
    b = make_budget(store, "user", "flaky", CAP)
    r1 = rid()
    res = store.reserve(r1, [b], 9 * CENT, now, TTL)
    settle(store, (r1, res.refs, 0))  # upstream error: nothing billed
    st = status(store, now, "user", "flaky")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (0, 0)
    assert store.reserve(rid(), [b], 9 * CENT, now, TTL).ok


@pytest.mark.postgres
def test_settling_and_reserving_on_shared_caps_do_not_deadlock(pg_module_url: str) -> None:
    """A reservation (user u2 and the team) and an audit batch settling two requests (u1 and the
    team, u2 and the team) lock the same rows. Steered into the interleaving where the batch holds
    the team's row while the reservation holds u2's (each pauses before its next statement on
    budget_spend), both must still finish: with the rows locked in different orders, PostgreSQL
    killed one as a deadlock — a request refused with 503, or an audit batch rolled back."""
    s = Store(pg_module_url)
    _empty_pg(s)
    try:
        now = utc(2026, 6, 10, 12)
        for i in range(40):  # budget ids well away from every other parameter value below
            make_budget(s, "user", f"filler{i}", CAP)
        u1 = make_budget(s, "user", "u1", 1000 * CENT)
        u2 = make_budget(s, "user", "u2", 1000 * CENT)
        team = make_budget(s, "team", "t", 1000 * CENT)
        a, b = rid(), rid()
        ra = s.reserve(a, [u1, team], CENT, now, TTL)
        rb = s.reserve(b, [u2, team], CENT, now, TTL)
        assert ra.ok and rb.ok

        reserver_holds_u2 = threading.Event()  # it is past its UPDATE of u2's row
        settler_holds_team = threading.Event()  # it is past its UPDATEs of u1's and the team's rows
        paused: set[str] = set()

        def params_of(parameters: Any) -> set[Any]:
            rows = parameters if isinstance(parameters, list) else [parameters]
            out: set[Any] = set()
            for p in rows:
                out.update(p.values() if isinstance(p, dict) else p or ())
            return out

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            me = threading.current_thread().name
            if "budget_spend" not in statement or me in paused:
                return
            values = params_of(parameters)
            if me == "reserver" and team.id in values:
                paused.add(me)
                reserver_holds_u2.set()
                settler_holds_team.wait(3)
            elif me == "settler" and u2.id in values:
                paused.add(me)
                reserver_holds_u2.wait(3)
                settler_holds_team.set()

        sa_event.listen(s.engine, "before_cursor_execute", before)
        errors: list[str] = []

        def reserver() -> None:
            try:
                assert s.reserve(rid(), [u2, team], CENT, now, TTL).ok
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(f"reserve: {type(e).__name__}: {str(e)[:160]}")

        def settler() -> None:
            try:
                settle(s, (a, ra.refs, CENT), (b, rb.refs, CENT))
            except Exception as e:  # noqa: BLE001
                errors.append(f"settle batch: {type(e).__name__}: {str(e)[:160]}")

        threads = [threading.Thread(target=reserver, name="reserver"), threading.Thread(target=settler, name="settler")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        sa_event.remove(s.engine, "before_cursor_execute", before)
        assert paused == {"reserver", "settler"}  # the interleaving was reached
        assert errors == []
        st = status(s, now, "team", "t")
        assert (st["spent_nusd"], st["reserved_nusd"]) == (2 * CENT, CENT)
    finally:
        s.close()


# ----------------------------------------------------------------------------- the Budgets stage


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# $0.0001 per input token, $0.01 per output token: the output limit dominates the estimate.
PRICES = {"openai:gpt-4o": PriceOverride.parse({"input": 100, "output": 10000})}


class Stage:
    """A Budgets stage on a real store and key registry, with a fake clock."""

    def __init__(self, store: Store, now: datetime, default_max_output_tokens: int = 20) -> None:
        self.store = store
        self.settings = parse_settings({"budgets": {"default_max_output_tokens": default_max_output_tokens}},
                                       {"OPENAI_API_KEY": "upstream-test"})
        self.registry = KeyRegistry(store)
        self.writer = AuditWriter(store)  # reservations commit through the audit writer, as in the gateway
        self.writer.start()
        self.rt: Any = SimpleNamespace(settings=self.settings, store=store, registry=self.registry,
                                       pricer=Pricer(PRICES), holds=LiveHolds(), writer=self.writer)
        self.clock = FakeClock(now)
        self.budgets = Budgets(self.rt, clock=self.clock)
        self.policy = Policy(self.rt)

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
            asyncio.run(self.budgets.request(f))
        return f

    def finish(self, f: http.HTTPFlow, actual_nusd: int) -> None:
        call = f.metadata[META]
        settle(self.store, (call.request_id, call.extra["reservation"], actual_nusd))


def chat(max_tokens: int | None = None, text: str = "hi") -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def usd(nano: int) -> Decimal:
    return (Decimal(nano) / Decimal(10**9)).quantize(Decimal("0.000001"))


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
def test_stage_blocks_until_the_period_turns(store: Store, period: str, boundary: datetime) -> None:
    st = Stage(store, boundary - timedelta(seconds=90))
    store.set_budget("user", "alice", CAP, period, actor="test")
    key = st.key("alice")

    first = st.request(key, chat(max_tokens=6))
    call = first.metadata[META]
    assert first.response is None and call.outcome is None
    estimate = call.extra["estimate_nusd"]
    assert 6 * CENT <= estimate < 7 * CENT  # 6 output tokens at $0.01 plus a few prompt tokens
    first.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    st.budgets.responseheaders(first)
    assert Decimal(first.response.headers[REMAINING_HEADER]) == usd(CAP - estimate)
    st.finish(first, estimate - 10_000)

    second = st.request(key, chat(max_tokens=6))
    assert second.response is not None and second.response.status_code == 429
    assert second.metadata[META].outcome == "blocked_cap"
    assert second.response.headers["retry-after"] == "90"  # exactly the seconds to the boundary
    err = error_of(second)
    assert err["code"] == "spendgate_budget_exceeded"
    for part in ("user alice", "cap", period, boundary.isoformat()):
        assert part in err["message"], (part, err["message"])
    assert spent_and_cap(err["message"]) == (usd(estimate - 10_000), usd(CAP))

    st.clock.now = boundary  # the clock turns; nothing was slept
    third = st.request(key, chat(max_tokens=6))
    assert third.response is None and third.metadata[META].extra["reservation"]
    assert status(store, boundary, "user", "alice")["reserved_nusd"] == third.metadata[META].extra["estimate_nusd"]


def test_stage_uses_the_default_output_limit_when_the_request_has_none(store: Store) -> None:
    st = Stage(store, utc(2026, 7, 1, 12), default_max_output_tokens=20)
    store.set_budget("user", "carol", CAP, "day", actor="test")
    key = st.key("carol")
    f = st.request(key, chat(max_tokens=None))  # estimate: 20 output tokens = $0.20 > $0.10
    assert f.response is not None and f.response.status_code == 429
    assert "would be passed by this request (estimated $0.2" in error_of(f)["message"]
    assert status(store, st.clock.now, "user", "carol")["reserved_nusd"] == 0
    assert st.request(key, chat(max_tokens=9)).response is None


def test_stage_team_and_global_caps_bind_without_a_user_cap(store: Store) -> None:
    st = Stage(store, utc(2026, 7, 1, 12))
    store.set_budget("team", "core", 15 * CENT, "week", actor="test")
    store.set_budget("global", "global", 20 * CENT, "month", actor="test")
    dave, erin, frank = st.key("dave", team="core"), st.key("erin", team="core"), st.key("frank")
    assert st.request(dave, chat(max_tokens=8)).response is None
    blocked = st.request(erin, chat(max_tokens=8))
    assert blocked.response is not None and blocked.response.status_code == 429
    assert "team core" in error_of(blocked)["message"]
    assert st.request(frank, chat(max_tokens=8)).response is None
    blocked = st.request(frank, chat(max_tokens=8))
    assert blocked.response is not None and "global" in error_of(blocked)["message"]
    assert int(blocked.response.headers["retry-after"]) == int((utc(2026, 8, 1) - st.clock.now).total_seconds())


def test_stage_negative_output_limit_does_not_create_headroom(store: Store) -> None:
    """max_tokens = -100000 would price the request at -$1000: held while it is in flight, such a
    "reservation" would free room under the cap for any number of real requests."""
    st = Stage(store, utc(2026, 7, 1, 12))
    store.set_budget("user", "mallory", CAP, "day", actor="test")
    key = st.key("mallory")
    st.request(key, chat(max_tokens=-100_000))  # refused or reserved at >= 0, either way no headroom
    assert status(store, st.clock.now, "user", "mallory")["reserved_nusd"] >= 0
    assert st.request(key, chat(max_tokens=6)).response is None
    blocked = st.request(key, chat(max_tokens=6))  # $0.12 in flight would pass the $0.10 cap
    assert blocked.response is not None and blocked.response.status_code == 429


def test_stage_absurd_output_limit_is_a_cap_refusal_not_a_store_failure(store: Store) -> None:
    """max_tokens = 10**15 estimates at $10**10: more than any cap, so 429 — not a 503
    "cannot check your budget, try again" from an integer overflow in the database (SQLite)."""
    st = Stage(store, utc(2026, 7, 1, 12))
    store.set_budget("user", "bigspender", CAP, "day", actor="test")
    key = st.key("bigspender")
    f = st.request(key, chat(max_tokens=10**15))
    assert f.response is not None
    assert (f.response.status_code, error_of(f)["code"]) == (429, "spendgate_budget_exceeded")
