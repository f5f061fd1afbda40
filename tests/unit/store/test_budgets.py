"""spendgate.store.budgets against a real database (SQLite in tmp_path, and PostgreSQL when reachable):
holds and settlement as the audit writer runs them (`batches.settle_and_reserve`: on PostgreSQL in the
server), period boundaries with an
injected clock, all-or-none holds across caps, caps exact under concurrency and within one batch,
expiry, and no deadlock between a batch and a reservation on PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import pytest
import sqlalchemy as sa

from spendgate.periods import period_end
from spendgate.stages.call import new_request_id
from spendgate.store import Database
from spendgate.store.batches import settle_and_reserve
from spendgate.store.budgets import (
    BudgetDef,
    BudgetLedger,
    BudgetRef,
    ReserveRequest,
    ReserveResult,
    Settlement,
)
from spendgate.store.keys import KeyStore
from tests.unit.databases import empty_pg

UTC = timezone.utc
TTL = timedelta(seconds=600)
CENT = 10_000_000  # nano-USD
CAP = 10 * CENT  # $0.10


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


# The first instant of a period, per period kind (the last instant of the previous one is 1 µs before).
BOUNDARIES = [
    pytest.param("day", utc(2026, 4, 1), id="day"),
    pytest.param("day", utc(2027, 1, 1), id="day-new-year"),
    pytest.param("week", utc(2026, 3, 30), id="week-sunday-to-monday"),
    pytest.param("week", utc(2027, 1, 4), id="week-across-new-year"),
    pytest.param("month", utc(2026, 2, 1), id="month"),
    pytest.param("month", utc(2028, 3, 1), id="month-leap-february"),
    pytest.param("month", utc(2027, 1, 1), id="month-december"),
]


def make_budget(db: Database, scope: str, name: str, cap_nusd: int, period: str = "day") -> BudgetDef:
    keys = KeyStore(db)
    keys.set_budget(scope, name, cap_nusd, period, actor="test")
    return next(b for b in keys.load_budgets() if (b.scope, b.name) == (scope, name))


def batch(db: Database, settles: Sequence[Settlement] = (), reserves: Sequence[ReserveRequest] = ()
          ) -> list[ReserveResult]:
    """One audit writer batch: its settlements and reservations in one transaction."""
    with db.transaction() as conn:
        return settle_and_reserve(conn, settles, reserves)


def reserve(db: Database, request_id: str, budgets: Sequence[BudgetDef], amount_nusd: int, now: datetime,
            ttl: timedelta = TTL) -> ReserveResult:
    """One request's hold, alone in its batch."""
    (result,) = batch(db, reserves=[ReserveRequest(request_id, tuple(budgets), amount_nusd, now, ttl)])
    return result


def settle(db: Database, *items: tuple[str, tuple[BudgetRef, ...], int]) -> None:
    """What the audit writer does when requests end: their settlements in one batch transaction."""
    batch(db, settles=[Settlement(rid, refs, actual) for rid, refs, actual in items])


def admitted(result: ReserveResult) -> bool:
    return result.blocked is None


def status(db: Database, now: datetime, scope: str, name: str) -> dict[str, Any]:
    return next(r for r in BudgetLedger(db).budget_status(now) if (r["scope"], r["name"]) == (scope, name))


def spend(db: Database, now: datetime) -> dict[str, tuple[int, int]]:
    rows = BudgetLedger(db).budget_status(now)
    return {f"{b['scope']}:{b['name']}": (b["spent_nusd"], b["reserved_nusd"]) for b in rows}


def rid() -> str:
    return new_request_id()


# ----------------------------------------------------------------------------- reserve / settle


@pytest.mark.parametrize("period,boundary", BOUNDARIES)
def test_period_boundary_resets_the_spend(db: Database, period: str, boundary: datetime) -> None:
    b = make_budget(db, "user", "alice", CAP, period)
    before = boundary - timedelta(seconds=1)

    r1 = rid()
    res = reserve(db, r1, [b], 6 * CENT, before)
    assert admitted(res) and res.remaining_nusd == 4 * CENT
    settle(db, (r1, res.refs, 6 * CENT))
    assert status(db, before, "user", "alice")["spent_nusd"] == 6 * CENT

    blocked = reserve(db, rid(), [b], 6 * CENT, before + timedelta(milliseconds=500))
    assert not admitted(blocked) and blocked.blocked is not None
    assert blocked.blocked.resets_at == boundary
    assert (blocked.blocked.spent_nusd, blocked.blocked.cap_nusd) == (6 * CENT, CAP)

    # The first instant of the next period (given in a non-UTC zone): the spend starts again from 0.
    r3 = rid()
    after = reserve(db, r3, [b], 6 * CENT, boundary.astimezone(timezone(timedelta(hours=-8))))
    assert admitted(after), after.blocked
    now_status = status(db, boundary, "user", "alice")
    assert (now_status["spent_nusd"], now_status["reserved_nusd"]) == (0, 6 * CENT)
    assert now_status["resets_at"] == period_end(period, boundary) > boundary
    old_status = status(db, before, "user", "alice")
    assert (old_status["spent_nusd"], old_status["reserved_nusd"]) == (6 * CENT, 0)

    # ...and accumulates normally inside the new period.
    settle(db, (r3, after.refs, 5 * CENT))
    again = reserve(db, rid(), [b], 6 * CENT, boundary + timedelta(seconds=1))
    assert not admitted(again) and again.blocked is not None and again.blocked.spent_nusd == 5 * CENT


def test_request_across_midnight_is_charged_to_the_day_it_started(db: Database) -> None:
    b = make_budget(db, "user", "night-owl", CAP, "day")
    r1 = rid()
    res = reserve(db, r1, [b], 6 * CENT, utc(2026, 5, 1, 23, 59, 59))
    assert admitted(res)
    # Still in flight after midnight: the new day's whole cap is available.
    r2 = rid()
    new_day = reserve(db, r2, [b], CAP, utc(2026, 5, 2, 0, 0, 1))
    assert admitted(new_day), new_day.blocked
    settle(db, (r1, res.refs, 5 * CENT))
    old = status(db, utc(2026, 5, 1, 12), "user", "night-owl")
    new = status(db, utc(2026, 5, 2, 12), "user", "night-owl")
    assert (old["spent_nusd"], old["reserved_nusd"]) == (5 * CENT, 0)
    assert (new["spent_nusd"], new["reserved_nusd"]) == (0, CAP)


def test_reservation_is_all_or_nothing_across_caps(db: Database) -> None:
    now = utc(2026, 6, 10, 12)
    user = make_budget(db, "user", "bob", 100 * CENT)
    team = make_budget(db, "team", "core", 5 * CENT)
    glob = make_budget(db, "global", "global", 1000 * CENT)
    res = reserve(db, rid(), [user, team, glob], 6 * CENT, now)
    assert res.blocked is not None and (res.blocked.scope, res.blocked.name) == ("team", "core")
    # Nothing stays held on the caps that had room.
    for scope, name in (("user", "bob"), ("team", "core"), ("global", "global")):
        assert status(db, now, scope, name)["reserved_nusd"] == 0
    ok = reserve(db, rid(), [user, team, glob], 5 * CENT, now)
    assert admitted(ok) and ok.remaining_nusd == 0  # the tightest cap's headroom
    assert [status(db, now, s, n)["reserved_nusd"] for s, n in
            (("user", "bob"), ("team", "core"), ("global", "global"))] == [5 * CENT] * 3


def test_concurrent_reservations_never_pass_the_cap(db: Database) -> None:
    now = utc(2026, 6, 10, 12)
    b = make_budget(db, "user", "swarm", CAP)
    start = threading.Barrier(40)
    results: list[tuple[str, ReserveResult]] = []
    lock = threading.Lock()

    def one() -> None:
        r = rid()
        start.wait()
        res = reserve(db, r, [b], CENT + 1, now)  # 9 fit in $0.10, the 10th does not
        with lock:
            results.append((r, res))

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    passed = [(r, res) for r, res in results if admitted(res)]
    assert len(results) == 40 and len(passed) == 9
    assert status(db, now, "user", "swarm")["reserved_nusd"] == 9 * (CENT + 1)
    settle(db, *[(r, res.refs, CENT) for r, res in passed])
    st = status(db, now, "user", "swarm")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (9 * CENT, 0)


def test_expired_reservations_are_released_once(db: Database) -> None:
    t0 = utc(2026, 6, 10, 12)
    user = make_budget(db, "user", "crashy", CAP)
    team = make_budget(db, "team", "ops", CAP)
    ledger = BudgetLedger(db)
    r1 = rid()
    res = reserve(db, r1, [user, team], 6 * CENT, t0, timedelta(seconds=3))
    assert admitted(res)
    assert ledger.release_expired(t0 + timedelta(seconds=2)) == 0
    assert status(db, t0, "user", "crashy")["reserved_nusd"] == 6 * CENT
    assert ledger.release_expired(t0 + timedelta(seconds=4)) == 2  # one per cap
    assert ledger.release_expired(t0 + timedelta(seconds=5)) == 0
    for scope, name in (("user", "crashy"), ("team", "ops")):
        assert status(db, t0, scope, name)["reserved_nusd"] == 0
    # A request that did finish after all (its gateway was only slow): charged, never released twice.
    settle(db, (r1, res.refs, 5 * CENT))
    st = status(db, t0, "user", "crashy")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (5 * CENT, 0)


def test_extended_reservations_do_not_expire(db: Database) -> None:
    t0 = utc(2026, 6, 10, 12)
    b = make_budget(db, "user", "slow", CAP)
    ledger = BudgetLedger(db)
    running, dead = rid(), rid()
    reserve(db, running, [b], 2 * CENT, t0, timedelta(seconds=3))
    reserve(db, dead, [b], 3 * CENT, t0, timedelta(seconds=3))
    ledger.extend_reservations([running], t0 + timedelta(minutes=10))  # its instance is alive
    assert ledger.release_expired(t0 + timedelta(seconds=4)) == 1
    assert status(db, t0, "user", "slow")["reserved_nusd"] == 2 * CENT


def test_failed_request_releases_its_reservation(db: Database) -> None:
    now = utc(2026, 6, 10, 12)
    b = make_budget(db, "user", "flaky", CAP)
    r1 = rid()
    res = reserve(db, r1, [b], 9 * CENT, now)
    settle(db, (r1, res.refs, 0))  # upstream error: nothing billed
    st = status(db, now, "user", "flaky")
    assert (st["spent_nusd"], st["reserved_nusd"]) == (0, 0)
    assert admitted(reserve(db, rid(), [b], 9 * CENT, now))


# ----------------------------------------------------------------------------- several requests in one batch

NOW = utc(2026, 11, 25, 12)


def test_one_batch_admits_exactly_what_fits(db: Database) -> None:
    u = make_budget(db, "user", "u", 1000)
    results = batch(db, reserves=[ReserveRequest(f"r{i}", (u,), 300, NOW, TTL) for i in range(5)])
    assert [admitted(r) for r in results] == [True, True, True, False, False]
    assert results[2].remaining_nusd == 100
    assert results[3].blocked is not None and results[3].blocked.reserved_nusd == 900
    assert spend(db, NOW)["user:u"] == (0, 900)


def test_a_request_refused_by_a_later_cap_gives_back_its_earlier_holds(db: Database) -> None:
    make_budget(db, "user", "u", 10_000)  # id 1: plenty
    make_budget(db, "team", "t", 500)  # id 2: tight
    budgets = tuple(sorted(KeyStore(db).load_budgets(), key=lambda b: b.id))
    results = batch(db, reserves=[
        ReserveRequest("a", budgets, 400, NOW, TTL),
        ReserveRequest("b", budgets, 400, NOW, TTL),  # fits the user cap, not the team cap
    ])
    assert admitted(results[0]) and not admitted(results[1])
    assert results[1].blocked is not None and results[1].blocked.scope == "team"
    assert spend(db, NOW) == {"user:u": (0, 400), "team:t": (0, 400)}, "b's user hold was given back"


def test_settle_and_reserve_in_one_batch(db: Database) -> None:
    u = make_budget(db, "user", "u", 1000)
    first = reserve(db, "a", [u], 800, NOW)
    assert admitted(first)
    # a settles at 100 while b asks for 800: the settlement frees room within the same transaction
    results = batch(db, [Settlement("a", first.refs, 100)], [ReserveRequest("b", (u,), 800, NOW, TTL)])
    assert admitted(results[0])
    assert spend(db, NOW)["user:u"] == (100, 800)



def test_a_settlement_lands_when_the_hold_beside_it_does_not_fit(db: Database) -> None:
    """A batch that settles on a row and holds there: a hold that does not fit leaves the settlement
    landed all the same, and a later hold in the batch sees it."""
    u = make_budget(db, "user", "u", 1000)
    first = reserve(db, "a", [u], 800, NOW)
    # a settles at 600 (reserved 800 -> 0, spent 600): b's 800 does not fit, c's 300 does
    results = batch(db, [Settlement("a", first.refs, 600)],
                    [ReserveRequest("b", (u,), 800, NOW, TTL), ReserveRequest("c", (u,), 300, NOW, TTL)])
    assert not admitted(results[0]) and admitted(results[1])
    why = results[0].blocked
    assert why is not None and (why.spent_nusd, why.reserved_nusd) == (600, 0)
    assert results[1].remaining_nusd == 100
    assert spend(db, NOW)["user:u"] == (600, 300)
    settle(db, ("c", results[1].refs, 300))
    assert spend(db, NOW)["user:u"] == (900, 0)

@pytest.mark.postgres
def test_settling_and_reserving_on_shared_caps_do_not_deadlock(pg_module_url: str) -> None:
    """Two batches that lock the same budget rows (on PostgreSQL one statement each, `pgbatch`), steered
    by a third connection into the interleaving that deadlocks when the rows are not locked in one
    order: batch Y (a hold on u2 and the team) waits for u2 first; batch X (a hold on u2, and the
    settlement of a request held on the team) comes next. Locked settlements-first, X would hold the
    team's row while waiting behind Y for u2, and Y would then wait for the team: PostgreSQL kills one
    as a deadlock (a request refused with 503, or an audit batch rolled back). In (budget, period)
    order X waits for u2 holding nothing, and both finish."""
    db = Database(pg_module_url)
    empty_pg(db)
    try:
        now = utc(2026, 6, 10, 12)
        u2 = make_budget(db, "user", "u2", 1000 * CENT)
        team = make_budget(db, "team", "t", 1000 * CENT)
        assert u2.id < team.id
        a = rid()
        ra = reserve(db, a, [team], CENT, now)
        reserve(db, rid(), [u2], CENT, now)  # both rows exist
        errors: list[str] = []

        def run(name: str, settles: Sequence[Settlement], reserves: Sequence[ReserveRequest]) -> threading.Thread:
            def go() -> None:
                try:
                    assert all(admitted(r) for r in batch(db, settles, reserves))
                except Exception as e:  # noqa: BLE001 - the test reports it
                    errors.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
            t = threading.Thread(target=go, name=name)
            t.start()
            return t

        def waiting_for_locks(n: int) -> None:
            deadline = time.monotonic() + 10
            with db.engine.connect() as watch:
                while time.monotonic() < deadline:
                    got = watch.execute(sa.text("SELECT count(*) FROM pg_stat_activity "
                                                "WHERE datname = current_database() AND wait_event_type = 'Lock'"))
                    if got.scalar() == n:
                        return
                    watch.rollback()  # PostgreSQL shows one snapshot of pg_stat_activity per transaction
                    time.sleep(0.02)
            raise AssertionError(f"{n} batches never waited for a row lock")

        with db.engine.connect() as blocker:
            blocker.execute(sa.text("SELECT 1 FROM budget_spend WHERE budget_id = :b FOR UPDATE"), {"b": u2.id})
            y = run("Y", [], [ReserveRequest(rid(), (u2, team), CENT, now, TTL)])
            waiting_for_locks(1)
            x = run("X", [Settlement(a, ra.refs, CENT)], [ReserveRequest(rid(), (u2,), CENT, now, TTL)])
            waiting_for_locks(2)
            blocker.rollback()
        for t in (x, y):
            t.join(30)
        assert errors == []
        st = status(db, now, "team", "t")
        assert (st["spent_nusd"], st["reserved_nusd"]) == (CENT, CENT)
        assert status(db, now, "user", "u2")["reserved_nusd"] == 3 * CENT
    finally:
        db.close()
