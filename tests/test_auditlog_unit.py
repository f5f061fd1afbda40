"""The audit writer against a real SQLite store: commit-before-resolve, group commit, and a
store that fails and comes back."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from spendgate.auditlog import AuditUnavailable, AuditWriter
from spendgate.store import Store


def row(**kw: Any) -> dict[str, Any]:
    base = {
        "id": "sgr_" + uuid.uuid4().hex[:24], "started_at": datetime.now(timezone.utc), "provider": "openai",
        "host": "api.openai.com", "method": "POST", "path": "/v1/chat/completions", "endpoint_kind": "chat",
        "model_requested": "gpt-4o", "outcome": "incomplete",
    }
    return base | kw


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{db}")
    s.upgrade()
    yield s
    s.close()


@pytest.fixture
def writer(store: Store) -> Iterator[AuditWriter]:
    w = AuditWriter(store)
    w.start()
    yield w
    w.stop()


def committed(db: Path) -> dict[str, tuple[Any, ...]]:
    """Rows as another connection sees them: only what is committed."""
    con = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT id, outcome, ended_at, input_tokens FROM audit_log")}
    finally:
        con.close()


def wait_until(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_begin_returns_once_the_row_is_committed(writer: AuditWriter, db: Path) -> None:
    r = row()

    async def go() -> dict[str, tuple[Any, ...]]:
        await writer.begin(r)
        return committed(db)  # read right away, from another connection

    seen = asyncio.run(go())
    assert seen[r["id"]][0] == "incomplete"
    assert writer.stats.committed_rows == 1 and writer.healthy


def test_concurrent_begins_are_committed_in_groups(writer: AuditWriter, db: Path) -> None:
    rows = [row() for _ in range(300)]

    async def go() -> None:
        await asyncio.gather(*(writer.begin(r) for r in rows))

    asyncio.run(go())
    assert set(committed(db)) == {r["id"] for r in rows}
    assert writer.stats.committed_rows == len(rows)
    # Group commit: far fewer transactions than rows (one per row would be 300).
    assert writer.stats.batches < len(rows) // 4, writer.stats
    assert writer.queue_depth == 0


def test_updates_and_inserts_are_queued_not_waited_for(writer: AuditWriter, db: Path) -> None:
    first = row()
    asyncio.run(writer.begin(first))
    late = row(outcome="blocked_auth")
    writer.update({"id": first["id"], "outcome": "completed", "ended_at": datetime.now(timezone.utc),
                   "input_tokens": 42})
    writer.insert(late)
    assert wait_until(lambda: committed(db).get(first["id"], ("",))[0] == "completed" and late["id"] in committed(db))
    assert committed(db)[first["id"]][2] == 42


def test_stop_flushes_what_is_queued(store: Store, db: Path) -> None:
    w = AuditWriter(store)
    w.start()
    rows = [row() for _ in range(50)]
    for r in rows:
        w.insert(r)
    w.stop()
    assert {r["id"] for r in rows} <= set(committed(db))


def test_store_down_fails_begin_fast_and_retries_queued_writes(writer: AuditWriter, store: Store, db: Path,
                                                              tmp_path: Path) -> None:
    opened = row()
    asyncio.run(writer.begin(opened))
    good_engine = store.engine
    # The store goes away: its file now lives in a directory that does not exist.
    store.engine = sa.create_engine(f"sqlite:///{tmp_path}/gone/audit.db")
    try:
        writer.update({"id": opened["id"], "outcome": "completed", "ended_at": datetime.now(timezone.utc)})
        refused = row(outcome="blocked_auth")
        writer.insert(refused)

        new = row()
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable):
            asyncio.run(writer.begin(new))
        assert time.monotonic() - t0 < 1.0, "a request must not wait on a dead store"
        assert wait_until(lambda: writer.stats.write_errors >= 2)
        assert not writer.healthy
        assert committed(db)[opened["id"]][0] == "incomplete"
    finally:
        store.engine.dispose()
        store.engine = good_engine

    # Back: the queued completion and refusal land without anyone asking again.
    assert wait_until(lambda: committed(db).get(opened["id"], ("",))[0] == "completed"), writer.stats
    assert wait_until(lambda: refused["id"] in committed(db))
    assert wait_until(lambda: writer.healthy and writer.queue_depth == 0)
    # The failed begin was reported to its caller, who refuses the request: no late row for it.
    assert new["id"] not in committed(db)
    again = row()
    asyncio.run(writer.begin(again))
    assert again["id"] in committed(db)


def test_a_row_the_store_rejects_does_not_block_the_others(writer: AuditWriter, db: Path) -> None:
    first = row()
    asyncio.run(writer.begin(first))
    duplicate = row(id=first["id"])  # primary key clash: this row can never be written
    others = [row() for _ in range(5)]
    writer.insert(duplicate)
    for r in others:
        writer.insert(r)
    assert wait_until(lambda: {r["id"] for r in others} <= set(committed(db))), writer.stats
    assert wait_until(lambda: writer.queue_depth == 0)
    assert writer.stats.write_errors >= 1


def test_begin_stays_fast_during_a_long_outage_and_after_it(writer: AuditWriter, store: Store,
                                                            tmp_path: Path) -> None:
    """Backing off between retries of *other* rows must not hold up a request's own begin:
    neither its refusal while the store is down, nor its commit once the store is back."""
    opened = row()
    asyncio.run(writer.begin(opened))
    good_engine = store.engine
    store.engine = sa.create_engine(f"sqlite:///{tmp_path}/gone/audit.db")
    try:
        writer.update({"id": opened["id"], "outcome": "completed", "ended_at": datetime.now(timezone.utc)})
        # Let the retries of that update back off to their longest pause.
        assert wait_until(lambda: writer.stats.write_errors >= 5, timeout=15)
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable):
            asyncio.run(writer.begin(row()))
        assert time.monotonic() - t0 < 1.0, f"begin took {time.monotonic() - t0:.2f}s to report a dead store"
    finally:
        store.engine.dispose()
        store.engine = good_engine
    t0 = time.monotonic()
    asyncio.run(writer.begin(row()))
    assert time.monotonic() - t0 < 1.0, f"begin took {time.monotonic() - t0:.2f}s with the store back"


async def _begin_all(writer: AuditWriter, rows: list[dict[str, Any]]) -> list[BaseException | None]:
    got = await asyncio.gather(*(writer.begin(r) for r in rows), return_exceptions=True)
    return [g if isinstance(g, BaseException) else None for g in got]


def _salvage_case(writer: AuditWriter, store: Store, bad: dict[str, Any]) -> None:
    """One row the store rejects, begun in the same group commit as good rows: every request gets
    its row committed (none is refused), and the bad row keeps its identity without the bad field."""
    good = [row() for _ in range(20)]
    results = asyncio.run(_begin_all(writer, [*good[:10], bad, *good[10:]]))
    assert results == [None] * 21, results
    with store.engine.connect() as conn:
        got = {r.id: r for r in conn.execute(sa.text("SELECT id, model_requested, user_agent, error FROM audit_log"))}
    assert {r["id"] for r in good} <= set(got)
    saved = got[bad["id"]]
    assert saved.error and "rejected by the store" in saved.error
    assert saved.model_requested is None and saved.user_agent is None
    assert writer.stats.write_errors >= 1


def test_a_row_sqlite_cannot_encode_is_saved_without_it(writer: AuditWriter, store: Store) -> None:
    # The stages fit rows before they get here; this proves the writer does not depend on it.
    _salvage_case(writer, store, row(user_agent="ua \ud800 lone surrogate"))


@pytest.mark.postgres
def test_a_row_postgresql_rejects_is_saved_without_it(pg_url: str) -> None:
    s = Store(pg_url)
    s.upgrade()
    w = AuditWriter(s)
    w.start()
    try:
        _salvage_case(w, s, row(model_requested="m" * 5000))
        _salvage_case(w, s, row(model_requested="nul \x00 byte"))
    finally:
        w.stop()
        s.close()
