"""`store.batches.write_batch`, the audit writer's transaction, on SQLite and PostgreSQL: on SQLite
statement by statement in the gateway, on PostgreSQL one call of `spendgate_write_batch` (`pgbatch`).
The same batch must leave the same rows and give the same answers on both."""

from __future__ import annotations

import dataclasses
import importlib
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from spendgate.store import Database
from spendgate.store.audit import COMPLETION, AuditLog, AuditRow, ContentRow
from spendgate.store.batches import Begin, Begun, Finished, Item, write_batch
from spendgate.store.budgets import BudgetLedger, ReserveRequest, Settlement
from spendgate.store.keys import KeyStore
from spendgate.store.plain import Prepared, Transaction
from spendgate.store.ratelimits import RateCheck, RateResult

UTC = timezone.utc
NOW = datetime(2026, 6, 10, 12, 0, 30, 250_000, tzinfo=UTC)
TTL = timedelta(seconds=600)


def row(rid: str, **kw: Any) -> AuditRow:
    fields: dict[str, Any] = {
        "id": rid, "started_at": NOW, "provider": "openai", "host": "api.openai.com", "method": "POST",
        "path": "/v1/chat/completions", "endpoint_kind": "chat", "model_requested": "gpt-4o",
        "outcome": "incomplete", "user": "ana", "team": "core", "key_id": "k0000001", "stream": True,
        "request_bytes": 900, "client_addr": "127.0.0.1", "user_agent": "ua/1 ✓", "instance_id": "i-1",
    }
    return AuditRow(**(fields | kw))


def every_completion_column(begun: AuditRow) -> AuditRow:
    """`begun` ended, with every column the completion writes set to something a default is not."""
    return dataclasses.replace(
        begun, ended_at=NOW + timedelta(seconds=2), status_code=200, outcome="completed", input_tokens=11,
        output_tokens=22, cache_read_tokens=3, cache_write_tokens=4, reasoning_tokens=5, usage_source="provider",
        cost_nusd=123_456, cost_source="provider", latency_ms=2000.5, ttft_ms=180.25, response_bytes=4096,
        model_reported="gpt-4o-2024-08-06", upstream_request_id="req_1", error="e", cut_fields="user_agent")


def budget(db: Database, name: str, cap: int) -> Any:
    keys = KeyStore(db)
    keys.set_budget("user", name, cap, "day", actor="test")
    return next(b for b in keys.load_budgets() if b.name == name)


def run(db: Database, items: list[Item]) -> list[Any]:
    link = db.link()
    try:
        write_batch(link, items)
        write_batch(link, [])  # the link is left usable, in a transaction or not
    finally:
        link.close()
    return [i.result for i in items]


def test_one_batch_of_every_kind_leaves_the_same_rows_on_either_store(db: Database) -> None:
    cap = budget(db, "ana", 1_000_000)
    tight = budget(db, "tight", 100)
    first, second = row("sgr_first"), row("sgr_second")
    (begun,) = run(db, [Item("begin", Begin(first, RateCheck("k0000001", 10, NOW),
                                            ReserveRequest("sgr_first", (cap,), 300_000, NOW, TTL)))])
    assert isinstance(begun, Begun) and begun.rate == RateResult(True)
    assert begun.reserved is not None and begun.reserved.blocked is None
    assert begun.reserved.remaining_nusd == 700_000
    done = every_completion_column(first)
    content = ContentRow("sgr_first", NOW, "k0000001", "asked for", '{"q": "é"}', '{"a": 1}')
    results = run(db, [
        Item("finish", Finished(done, True, Settlement("sgr_first", begun.reserved.refs, 250_000), content)),
        Item("begin", Begin(second, RateCheck("k0000001", 10, NOW), ReserveRequest("sgr_second", (cap,), 1, NOW, TTL))),
        Item("reserve", ReserveRequest("sgr_third", (cap, tight), 500, NOW, TTL)),
        Item("finish", Finished(every_completion_column(row("sgr_whole")), False)),
    ])
    assert results[0] is None and results[3] is None
    # The reservation item is held first (and on ana before tight refuses it and it gives ana back).
    assert results[1].rate == RateResult(True) and results[1].reserved.remaining_nusd == 1_000_000 - 250_000 - 500 - 1
    blocked = results[2].blocked
    assert blocked is not None and (blocked.name, blocked.cap_nusd, blocked.reserved_nusd) == ("tight", 100, 0)
    rows = {r.id: r for r in AuditLog(db).rows()}
    assert rows["sgr_first"] == done
    assert rows["sgr_whole"] == every_completion_column(row("sgr_whole"))
    assert rows["sgr_second"] == second
    spend = {b["name"]: (b["spent_nusd"], b["reserved_nusd"]) for b in BudgetLedger(db).budget_status(NOW)}
    assert spend == {"ana": (250_000, 1), "tight": (0, 0)}  # the refused reservation gave its hold on ana back
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT request_body FROM audit_content")).scalar() == '{"q": "é"}'
        assert conn.execute(sa.text("SELECT request_id FROM reservations")).scalars().all() == ["sgr_second"]


def test_a_request_over_its_rate_limit_takes_no_reservation(db: Database) -> None:
    cap = budget(db, "ana", 1_000_000)
    items = [Item("begin", Begin(row(f"sgr_{i}"), RateCheck("k0000001", 2, NOW),
                                 ReserveRequest(f"sgr_{i}", (cap,), 1000, NOW, TTL))) for i in range(3)]
    results = run(db, items)
    assert [r.rate.allowed for r in results] == [True, True, False]
    assert results[2].rate.retry_after == 60  # 29.75 s of this full minute, then half of it still weighs
    assert results[2].reserved is None
    assert BudgetLedger(db).budget_status(NOW)[0]["reserved_nusd"] == 2000


@pytest.mark.postgres
def test_on_postgresql_a_batch_is_one_statement_in_autocommit(pg_module_url: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.databases import empty_pg

    db = Database(pg_module_url)
    empty_pg(db)
    cap = budget(db, "ana", 1_000_000)
    sent: list[str] = []
    execute = Transaction.execute

    me = threading.current_thread()

    def counted(tx: Transaction, stmt: Any, params: Any = None) -> Any:
        if threading.current_thread() is me:  # not another test's writer thread still winding down
            sent.append(stmt.sql)
        return execute(tx, stmt, params)

    monkeypatch.setattr(Transaction, "execute", counted)
    link = db.link()
    try:
        first = row("sgr_a")
        write_batch(link, [Item("begin", Begin(first, RateCheck("k0000001", 5, NOW),
                                               ReserveRequest("sgr_a", (cap,), 10, NOW, TTL)))])
        assert len(sent) == 1 and "spendgate_write_batch" in sent[0]
        with pytest.raises(RuntimeError), link.transaction() as tx:  # the same link still runs transactions
            tx.execute(Prepared("INSERT INTO budget_spend (budget_id, period_start, spent_nusd, reserved_nusd) "
                                "VALUES (:b, :ps, 0, 0)", ("ps",)), {"b": cap.id, "ps": NOW - timedelta(days=9)})
            raise RuntimeError("rolled back")
        with db.engine.connect() as conn:  # nothing there: the insert was rolled back, not autocommitted
            assert conn.execute(sa.text("SELECT count(*) FROM budget_spend")).scalar() == 1
    finally:
        link.close()
    with db.engine.connect() as conn:  # the pool lends its connection as it was: in a transaction
        assert conn.connection.driver_connection.autocommit is False
    db.close()


def test_the_postgresql_function_completes_every_completion_column() -> None:
    migration = importlib.import_module("spendgate.store.migrations.versions.0007_batch_function")
    assert tuple(migration._COMPLETION) == COMPLETION


def test_requests_settled_together_release_exactly_what_each_held(db: Database) -> None:
    """Two requests' reservations on one budget row and one on two caps, settled in one batch: each
    row gives back what was held there (PostgreSQL sums what the DELETE released per row) and takes
    the actual costs; a settlement whose reservation has already gone (expired) releases nothing."""
    ana, team = budget(db, "ana", 1_000_000), budget(db, "team", 5_000_000)
    begun = run(db, [Item("begin", Begin(row(rid), None, ReserveRequest(rid, caps, amount, NOW, TTL)))
                     for rid, caps, amount in (("sgr_a", (ana,), 1000), ("sgr_b", (ana, team), 2000),
                                               ("sgr_c", (ana,), 4000))])
    with db.engine.begin() as conn:  # sgr_c's reservation expired and was swept (its hold released there)
        conn.execute(sa.text("DELETE FROM reservations WHERE request_id = 'sgr_c'"))
        conn.execute(sa.text("UPDATE budget_spend SET reserved_nusd = reserved_nusd - 4000 WHERE budget_id = :b"),
                     {"b": ana.id})
    spend = {b["name"]: (b["spent_nusd"], b["reserved_nusd"]) for b in BudgetLedger(db).budget_status(NOW)}
    assert spend == {"ana": (0, 3000), "team": (0, 2000)}
    run(db, [Item("finish", Finished(every_completion_column(row(rid)), True,
                                     Settlement(rid, b.reserved.refs, actual)))
             for rid, b, actual in (("sgr_a", begun[0], 700), ("sgr_b", begun[1], 1500), ("sgr_c", begun[2], 10))])
    spend = {b["name"]: (b["spent_nusd"], b["reserved_nusd"]) for b in BudgetLedger(db).budget_status(NOW)}
    assert spend == {"ana": (2210, 0), "team": (1500, 0)}
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM reservations")).scalar() == 0
