"""Reservations batched with the audit writes: all or none per request, caps exact within a batch."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from spendgate.store import ReserveRequest, Store

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
TTL = timedelta(minutes=10)


def _store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'b.db'}")
    s.upgrade()
    return s


def _spend(store: Store) -> dict[str, tuple[int, int]]:
    return {f"{b['scope']}:{b['name']}": (b["spent_nusd"], b["reserved_nusd"]) for b in store.budget_status(NOW)}


def test_one_batch_admits_exactly_what_fits(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_budget("user", "u", 1000, "day", actor="t")
    (u,) = store.load_budgets()
    reqs = [ReserveRequest(f"r{i}", (u,), 300, NOW, TTL) for i in range(5)]
    results = store.write_audit_batch([], [], [], [], reqs)
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert results[2].remaining_nusd == 100
    assert results[3].blocked is not None and results[3].blocked.reserved_nusd == 900
    assert _spend(store)["user:u"] == (0, 900)


def test_a_request_refused_by_a_later_cap_gives_back_its_earlier_holds(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_budget("user", "u", 10_000, "day", actor="t")  # id 1: plenty
    store.set_budget("team", "t", 500, "day", actor="t")  # id 2: tight
    budgets = tuple(sorted(store.load_budgets(), key=lambda b: b.id))
    results = store.write_audit_batch([], [], [], [], [
        ReserveRequest("a", budgets, 400, NOW, TTL),
        ReserveRequest("b", budgets, 400, NOW, TTL),  # fits the user cap, not the team cap
    ])
    assert results[0].ok and not results[1].ok
    assert results[1].blocked is not None and results[1].blocked.scope == "team"
    assert _spend(store) == {"user:u": (0, 400), "team:t": (0, 400)}, "b's user hold was given back"


def test_settle_and_reserve_in_one_batch(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_budget("user", "u", 1000, "day", actor="t")
    (u,) = store.load_budgets()
    first = store.reserve("a", [u], 800, NOW, TTL)
    assert first.ok
    # a settles at 100 while b asks for 800: the settlement frees room within the same transaction
    results = store.write_audit_batch([], [], [], [{"request_id": "a", "refs": first.refs, "actual_nusd": 100}],
                                      [ReserveRequest("b", (u,), 800, NOW, TTL)])
    assert results[0].ok
    assert _spend(store)["user:u"] == (100, 800)
