"""The audit writer (`spendgate.store.writer`) against a real SQLite store: commit-before-resolve,
group commit, a finished request as one transaction, a store that fails and comes back, and rows
the store rejects (SQLite, and PostgreSQL when reachable), and on SQLite the commits on the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import spendgate.store as store_module
from spendgate.store import Database, ts_param
from spendgate.store import wal as wal_module
from spendgate.store import writer as writer_module
from spendgate.store.audit import AuditRow, ContentRow
from spendgate.store.batches import settle_and_reserve as apply
from spendgate.store.budgets import BudgetLedger, ReserveRequest, Settlement
from spendgate.store.keys import KeyStore
from spendgate.store.writer import AuditUnavailable, AuditWriter, Finished
from tests.unit.databases import sqlite_database

NOW = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)


def row(**kw: Any) -> AuditRow:
    fields: dict[str, Any] = {
        "id": "sgr_" + uuid.uuid4().hex[:24], "started_at": datetime.now(timezone.utc), "provider": "openai",
        "host": "api.openai.com", "method": "POST", "path": "/v1/chat/completions", "endpoint_kind": "chat",
        "model_requested": "gpt-4o", "outcome": "incomplete",
    }
    return AuditRow(**(fields | kw))


def completed(begun: AuditRow, **kw: Any) -> AuditRow:
    """`begun` as it is when its request ends."""
    return dataclasses.replace(begun, **({"outcome": "completed", "ended_at": datetime.now(timezone.utc),
                                          "status_code": 200} | kw))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    d = sqlite_database(path)
    yield d
    d.close()


@pytest.fixture
def writer(db: Database) -> Iterator[AuditWriter]:
    w = AuditWriter(db)
    w.start()
    yield w
    w.stop()


def committed(path: Path) -> dict[str, tuple[Any, ...]]:
    """Rows as another connection sees them: only what is committed."""
    con = sqlite3.connect(path)
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


def test_begin_returns_once_the_row_is_committed(writer: AuditWriter, path: Path) -> None:
    r = row()

    async def go() -> dict[str, tuple[Any, ...]]:
        await writer.begin(r)
        return committed(path)  # read right away, from another connection

    seen = asyncio.run(go())
    assert seen[r.id][0] == "incomplete"
    assert writer.stats.committed_rows == 1 and writer.healthy


def test_concurrent_begins_are_committed_in_groups(writer: AuditWriter, path: Path) -> None:
    rows = [row() for _ in range(300)]

    async def go() -> None:
        await asyncio.gather(*(writer.begin(r) for r in rows))

    asyncio.run(go())
    assert set(committed(path)) == {r.id for r in rows}
    assert writer.stats.committed_rows == len(rows)
    # Group commit: far fewer transactions than rows (one per row would be 300).
    assert writer.stats.batches < len(rows) // 4, writer.stats
    assert writer.queue_depth == 0


def test_finished_requests_are_queued_not_waited_for(writer: AuditWriter, path: Path) -> None:
    first = row()
    asyncio.run(writer.begin(first))
    late = row(outcome="blocked_auth")  # refused before it was begun: inserted whole
    writer.finish(Finished(completed(first, input_tokens=42), begun=True))
    writer.finish(Finished(late, begun=False))
    assert wait_until(lambda: committed(path).get(first.id, ("",))[0] == "completed" and late.id in committed(path))
    assert committed(path)[first.id][2] == 42


def test_stop_flushes_what_is_queued(db: Database, path: Path) -> None:
    w = AuditWriter(db)
    w.start()
    rows = [row(outcome="blocked_auth") for _ in range(50)]
    for r in rows:
        w.finish(Finished(r, begun=False))
    w.stop()
    assert {r.id for r in rows} <= set(committed(path))


def test_store_down_fails_begin_fast_and_retries_queued_writes(writer: AuditWriter, db: Database, path: Path,
                                                              tmp_path: Path) -> None:
    opened = row()
    asyncio.run(writer.begin(opened))
    good_engine = db.engine
    # The store goes away: its file now lives in a directory that does not exist.
    db.engine = sa.create_engine(f"sqlite:///{tmp_path}/gone/audit.db")
    try:
        writer.finish(Finished(completed(opened), begun=True))
        refused = row(outcome="blocked_auth")
        writer.finish(Finished(refused, begun=False))

        new = row()
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable):
            asyncio.run(writer.begin(new))
        assert time.monotonic() - t0 < 1.0, "a request must not wait on a dead store"
        assert wait_until(lambda: writer.stats.write_errors >= 2)
        assert not writer.healthy
        assert committed(path)[opened.id][0] == "incomplete"
    finally:
        db.engine.dispose()
        db.engine = good_engine

    # Back: the queued completion and refusal land without anyone asking again.
    assert wait_until(lambda: committed(path).get(opened.id, ("",))[0] == "completed"), writer.stats
    assert wait_until(lambda: refused.id in committed(path))
    assert wait_until(lambda: writer.healthy and writer.queue_depth == 0)
    # The failed begin was reported to its caller, who refuses the request: no late row for it.
    assert new.id not in committed(path)
    again = row()
    asyncio.run(writer.begin(again))
    assert again.id in committed(path)


def test_a_row_the_store_rejects_does_not_block_the_others(writer: AuditWriter, path: Path) -> None:
    first = row()
    asyncio.run(writer.begin(first))
    duplicate = row(id=first.id, outcome="blocked_auth")  # primary key clash: this row can never be written
    others = [row(outcome="blocked_auth") for _ in range(5)]
    writer.finish(Finished(duplicate, begun=False))
    for r in others:
        writer.finish(Finished(r, begun=False))
    assert wait_until(lambda: {r.id for r in others} <= set(committed(path))), writer.stats
    assert wait_until(lambda: writer.queue_depth == 0)
    assert writer.stats.write_errors >= 1


def test_begin_stays_fast_during_a_long_outage_and_after_it(writer: AuditWriter, db: Database,
                                                            tmp_path: Path) -> None:
    """Backing off between retries of *other* rows must not hold up a request's own begin:
    neither its refusal while the store is down, nor its commit once the store is back."""
    opened = row()
    asyncio.run(writer.begin(opened))
    good_engine = db.engine
    db.engine = sa.create_engine(f"sqlite:///{tmp_path}/gone/audit.db")
    try:
        writer.finish(Finished(completed(opened), begun=True))
        # Let the retries of that completion back off to their longest pause.
        assert wait_until(lambda: writer.stats.write_errors >= 5, timeout=15)
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable):
            asyncio.run(writer.begin(row()))
        assert time.monotonic() - t0 < 1.0, f"begin took {time.monotonic() - t0:.2f}s to report a dead store"
    finally:
        db.engine.dispose()
        db.engine = good_engine
    t0 = time.monotonic()
    asyncio.run(writer.begin(row()))
    assert time.monotonic() - t0 < 1.0, f"begin took {time.monotonic() - t0:.2f}s with the store back"


# ----------------------------------------------------------------------------- one request, one transaction


def test_completion_settlement_and_content_commit_together_or_not_at_all(
        writer: AuditWriter, db: Database, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished request is one writer item. Its content row is made to fail (one with its request
    id is already there): at no commit may its completion be in without its settlement or the other
    way round, and in the end both are in, without the content, as the row says."""
    keys = KeyStore(db)
    keys.set_budget("user", "alice", 10**9, "day", actor="t")
    (cap,) = keys.load_budgets()
    reqs = [row(user="alice", started_at=NOW, content_captured=True) for _ in range(3)]
    with db.transaction() as conn:
        holds = apply(conn, [], [ReserveRequest(r.id, (cap,), 1000, NOW, timedelta(minutes=10)) for r in reqs])
    for r in reqs:
        asyncio.run(writer.begin(r))
    bad = reqs[0]
    with db.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO audit_content (request_id, captured_at, reason) VALUES (:r, :t, 'there')")
                     .bindparams(ts_param("t")), {"r": bad.id, "t": NOW})

    def state() -> dict[str, tuple[bool, bool]]:
        """Per request, as another connection sees it: (completed, settled)."""
        con = sqlite3.connect(path)
        try:
            done = {r[0] for r in con.execute("SELECT id FROM audit_log WHERE outcome != 'incomplete'")}
            held = {r[0] for r in con.execute("SELECT request_id FROM reservations")}
        finally:
            con.close()
        return {r.id: (r.id in done, r.id not in held) for r in reqs}

    seen: list[dict[str, tuple[bool, bool]]] = []
    real_write = writer._write

    def write_and_look(batch: Any) -> None:  # runs on the writer thread, once per transaction tried
        try:
            real_write(batch)
        finally:
            seen.append(state())

    monkeypatch.setattr(writer, "_write", write_and_look)
    for r, hold in zip(reqs, holds):
        content = ContentRow(r.id, NOW, None, "key capture on", '{"prompt": 1}', '{"answer": 2}')
        writer.finish(Finished(completed(r, cost_nusd=400), True,
                               Settlement(r.id, hold.refs, 400), content))
    assert wait_until(lambda: writer.queue_depth == 0 and all(s == (True, True) for s in state().values()))

    assert len(seen) >= 3  # the batch, then its items one by one
    for snapshot in seen:
        for request, (done, settled) in snapshot.items():
            assert done == settled, (request, snapshot)
    with db.engine.connect() as conn:
        contents = dict(conn.execute(sa.text("SELECT request_id, reason FROM audit_content")).all())
        rows = {r.id: r for r in conn.execute(sa.text("SELECT id, content_captured, error, cost_nusd FROM audit_log"))}
    assert contents[bad.id] == "there"  # the row that was in the way is untouched
    assert all(contents[r.id] == "key capture on" for r in reqs[1:])
    assert "captured content rejected by the store" in rows[bad.id].error
    assert all(rows[r.id].error is None for r in reqs[1:])
    assert all(rows[r.id].cost_nusd == 400 for r in reqs)
    (budget,) = BudgetLedger(db).budget_status(NOW)
    assert (budget["spent_nusd"], budget["reserved_nusd"]) == (3 * 400, 0)


def _lost_answer_case(writer: AuditWriter, db: Database, monkeypatch: pytest.MonkeyPatch, target: Any,
                      name: str) -> None:
    """A finished request's batch commits, then its answer is lost (the connection goes away): the
    writer thread writes the batch again. The completion stands, its cost is counted once."""
    keys = KeyStore(db)
    keys.set_budget("user", "erin", 10**9, "day", actor="t")
    (cap,) = keys.load_budgets()
    r = row(user="erin", started_at=NOW)
    with db.transaction() as conn:
        (hold,) = apply(conn, [], [ReserveRequest(r.id, (cap,), 1000, NOW, timedelta(minutes=10))])
    asyncio.run(writer.begin(r))
    real = getattr(target, name)
    lost: list[int] = []

    def lose_the_first_answer() -> None:
        if not lost:
            lost.append(1)
            raise ConnectionResetError("the answer was lost")

    def write(*args: Any) -> None:
        real(*args)
        lose_the_first_answer()

    async def write_async(*args: Any) -> None:
        await real(*args)
        lose_the_first_answer()

    monkeypatch.setattr(target, name, write_async if asyncio.iscoroutinefunction(real) else write)

    async def finish() -> None:
        writer.finish(Finished(completed(r, cost_nusd=400), True, Settlement(r.id, hold.refs, 400)))
        await asyncio.sleep(0.1)  # the completion lingers on the loop, then commits there

    asyncio.run(finish())
    assert wait_until(lambda: writer.queue_depth == 0 and writer.stats.handed_over >= 1), writer.stats
    assert lost
    (budget,) = BudgetLedger(db).budget_status(NOW)
    assert (budget["spent_nusd"], budget["reserved_nusd"]) == (400, 0)
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT outcome, cost_nusd FROM audit_log WHERE id = :i"), {"i": r.id}).one() \
            == ("completed", 400)


def test_a_batch_whose_answer_was_lost_is_not_settled_twice(writer: AuditWriter, db: Database,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _lost_answer_case(writer, db, monkeypatch, writer, "_write")


# ----------------------------------------------------------------------------- rows the store rejects


async def _begin_all(writer: AuditWriter, rows: list[AuditRow]) -> list[BaseException | None]:
    got = await asyncio.gather(*(writer.begin(r) for r in rows), return_exceptions=True)
    return [g if isinstance(g, BaseException) else None for g in got]


def _salvage_case(writer: AuditWriter, db: Database, bad: AuditRow) -> None:
    """One row the store rejects, begun in the same group commit as good rows: every request gets
    its row committed (none is refused), and the bad row keeps its identity without the bad field."""
    good = [row() for _ in range(20)]
    results = asyncio.run(_begin_all(writer, [*good[:10], bad, *good[10:]]))
    assert results == [None] * 21, results
    with db.engine.connect() as conn:
        got = {r.id: r for r in conn.execute(sa.text("SELECT id, model_requested, user_agent, error FROM audit_log"))}
    assert {r.id for r in good} <= set(got)
    saved = got[bad.id]
    assert saved.error and "rejected by the store" in saved.error
    assert saved.model_requested is None and saved.user_agent is None
    assert writer.stats.write_errors >= 1


def test_a_row_sqlite_cannot_encode_is_saved_without_it(writer: AuditWriter, db: Database) -> None:
    # The Record stage fits rows before they get here; this proves the writer does not depend on it.
    _salvage_case(writer, db, row(user_agent="ua \ud800 lone surrogate"))


@pytest.mark.postgres
def test_a_row_postgresql_rejects_is_saved_without_it(pg_url: str) -> None:
    d = Database(pg_url)
    d.upgrade()
    w = AuditWriter(d)
    w.start()
    try:
        _salvage_case(w, d, row(model_requested="m" * 5000))
        _salvage_case(w, d, row(model_requested="nul \x00 byte"))
        _salvage_case(w, d, row(user_agent="ua \ud800 lone surrogate"))  # JSON can carry it; jsonb cannot
    finally:
        w.stop()
        d.close()


# -- SQLite: commits on the event loop. A waiting request's row is committed there with no thread
# hand-over, a locked database never blocks the loop (the writer thread waits for the lock),
# completions left behind by a loop that is gone still land, and the thread checkpoints the WAL.


def test_a_waiting_row_is_committed_on_the_loop_in_one_batch(writer: AuditWriter, path: Path) -> None:
    rows = [row() for _ in range(20)]

    async def go() -> None:
        await asyncio.gather(*(writer.begin(r) for r in rows))  # one loop iteration's worth

    asyncio.run(go())
    assert {r.id for r in rows} <= set(committed(path))
    assert (writer.stats.loop_batches, writer.stats.batches, writer.stats.handed_over) == (1, 1, 0)


def test_a_locked_database_never_blocks_the_loop(writer: AuditWriter, path: Path) -> None:
    """Another process (the CLI, say) holds the write lock for 0.6 s: the loop's commit does not
    wait for it (no busy timeout there); the writer thread does, and the row lands after."""
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.6, lambda: locker.execute("COMMIT"))
    r = row()

    async def go() -> tuple[float, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        t0 = time.perf_counter()
        await writer.begin(r)
        took = time.perf_counter() - t0
        stop.set()
        await ticker
        return took, max(gaps)

    released.start()
    try:
        took, worst_gap = asyncio.run(go())
    finally:
        released.join()
        locker.close()
    assert took >= 0.5  # it really waited for the lock (in the thread) ...
    assert worst_gap < 0.1, f"the event loop stalled {worst_gap * 1000:.0f} ms"  # ... and the loop did not
    assert r.id in committed(path)
    assert writer.stats.handed_over == 1 and writer.stats.write_errors == 0


def test_completions_left_on_a_finished_loop_still_land(writer: AuditWriter, path: Path) -> None:
    """A completion lingers on the loop for the next commit; the loop ends first (a test's
    asyncio.run, or the gateway shutting down): the next loop, or stop(), hands it over."""
    first, second = row(), row()

    async def begin_and_finish(r: object) -> None:
        await writer.begin(r)  # type: ignore[arg-type]
        writer.finish(Finished(completed(r), begun=True))  # type: ignore[arg-type]

    asyncio.run(begin_and_finish(first))
    asyncio.run(begin_and_finish(second))  # another loop: the first completion is handed over
    assert wait_until(lambda: committed(path).get(first.id, ("",))[0] == "completed")
    writer.stop()  # the second completion is on a loop that is gone: stop() writes it
    assert committed(path)[second.id][0] == "completed"


def test_the_thread_checkpoints_the_wal_the_loop_writes(writer: AuditWriter, path: Path, tmp_path: Path) -> None:
    """The loop's connection never checkpoints (that would fsync on the loop): without the
    thread's checkpoint the database file would never see a row and the WAL would grow forever."""
    rows = [row() for _ in range(300)]

    async def go() -> None:
        for r in rows:
            await writer.begin(r)

    asyncio.run(go())
    copy = tmp_path / "checkpointed.db"

    def in_the_file() -> int:
        shutil.copyfile(path, copy)  # the database file alone, without its WAL: what was checkpointed
        con = sqlite3.connect(copy)
        try:
            return int(con.execute("SELECT count(*) FROM audit_log").fetchone()[0])
        finally:
            con.close()

    assert wait_until(lambda: in_the_file() == len(rows), timeout=5)


def test_a_checkpoint_pass_is_due_every_few_seconds_or_every_few_hundred_commits() -> None:
    """A pass copies each page the commits since the last one changed, mostly the same few hot
    pages: so one pass every CHECKPOINT_EVERY seconds, or sooner once CHECKPOINT_COMMITS landed."""
    now = [100.0]
    due = wal_module.Due(lambda: now[0])
    now[0] += wal_module.CHECKPOINT_SECONDS
    assert not due(10)
    now[0] += wal_module.CHECKPOINT_EVERY
    assert due(10)  # the interval is up
    assert not due(11)
    assert not due(10 + wal_module.CHECKPOINT_COMMITS - 1)
    assert due(10 + wal_module.CHECKPOINT_COMMITS)  # enough commits, long before the interval
    now[0] += wal_module.CHECKPOINT_EVERY
    assert due(10 + wal_module.CHECKPOINT_COMMITS)  # idle: a pass now and then all the same (a WAL to truncate)


def test_the_wal_stays_bounded_while_the_loop_never_pauses(writer: AuditWriter, path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests back to back for 3 s, never a pause: a checkpoint pass always ends with frames the
    loop appended meanwhile, so passes alone never let the WAL restart (1.3 GB after 50,000
    requests). The thread restarts it once it holds WAL_RESTART; a file a burst left larger than
    WAL_LIMIT it truncates once the burst is over."""
    monkeypatch.setattr(wal_module, "WAL_RESTART", 8 * 1024 * 1024)
    wal = path.with_name(path.name + "-wal")
    largest = 0

    async def go() -> int:
        nonlocal largest
        n, until = 0, time.monotonic() + 3.0
        while time.monotonic() < until:
            r = row()
            await writer.begin(r)
            writer.finish(Finished(completed(r), begun=True))
            n += 1
            if n % 200 == 0:
                largest = max(largest, wal.stat().st_size)
        return n

    n = asyncio.run(go())
    assert n > 8000, n  # an unbounded WAL takes ~25 KB a request: 200 MB and more (320 MB seen)
    # A restart is due every 0.25 s once 8 MiB are in it; between two checks the loop may add ~60 MB.
    assert largest < 120 * 1024 * 1024, f"WAL reached {largest / 1e6:.0f} MB after {n} requests"
    assert wait_until(lambda: len(committed(path)) == n)
    monkeypatch.setattr(wal_module, "WAL_LIMIT", 16 * 1024 * 1024)  # as if the burst had left more
    assert wait_until(lambda: wal.stat().st_size <= wal_module.WAL_LIMIT, timeout=5), wal.stat().st_size


def test_a_lock_held_past_the_busy_timeout_is_waited_out_not_blamed_on_the_rows(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection holds the write lock longer than the thread's busy timeout. The store is
    busy, not the row bad: the completion is retried until it lands whole (not isolated, salvaged
    or dropped), and a request's begin meanwhile is refused at once (fail closed)."""
    monkeypatch.setattr(writer_module, "THREAD_PRAGMAS", ("PRAGMA busy_timeout=100",))
    db = sqlite_database(path)
    w = AuditWriter(db)
    w.start()
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        opened = row()
        asyncio.run(w.begin(opened))
        locker.execute("BEGIN IMMEDIATE")
        try:
            w.finish(Finished(completed(opened, input_tokens=7), begun=True))
            assert wait_until(lambda: w.stats.write_errors >= 1, timeout=5), w.stats
            assert not w.healthy
            with pytest.raises(AuditUnavailable):
                asyncio.run(w.begin(row()))
        finally:
            locker.execute("COMMIT")
        assert wait_until(lambda: committed(path)[opened.id][0] == "completed", timeout=10), committed(path)
        outcome, _, tokens = committed(path)[opened.id]
        assert tokens == 7  # the whole completion, not a salvaged one
        assert wait_until(lambda: w.queue_depth == 0) and w.healthy
    finally:
        locker.close()
        w.stop()
        db.close()


# -- PostgreSQL: batches awaited on the event loop (`pgloop`). Requests waiting together share one
# statement there; a connection that breaks hands its batch to the writer thread (the request
# still gets its row); stop() waits for the batch in flight instead of leaving it behind.


@pytest.fixture
def pg_writer(pg_module_url: str) -> Iterator[tuple[AuditWriter, Database]]:
    d = Database(pg_module_url)
    w = AuditWriter(d)
    w.start()
    yield w, d
    w.stop()
    d.close()


def pg_committed(db: Database, ids: list[str]) -> dict[str, str]:
    with db.engine.connect() as conn:
        found = conn.execute(sa.text("SELECT id, outcome FROM audit_log WHERE id = ANY(:ids)"), {"ids": ids})
        return {r.id: r.outcome for r in found}


@pytest.mark.postgres
def test_postgresql_waiting_rows_are_committed_on_the_loop_in_one_statement(
        pg_writer: tuple[AuditWriter, Database]) -> None:
    writer, db = pg_writer
    rows = [row() for _ in range(20)]

    async def go() -> None:
        await asyncio.gather(*(writer.begin(r) for r in rows))

    asyncio.run(go())
    assert pg_committed(db, [r.id for r in rows]) == {r.id: "incomplete" for r in rows}
    assert (writer.stats.loop_batches, writer.stats.batches, writer.stats.handed_over) == (1, 1, 0)


@pytest.mark.postgres
def test_postgresql_a_broken_loop_connection_hands_its_batch_to_the_thread(
        pg_writer: tuple[AuditWriter, Database], pg_module_url: str) -> None:
    writer, db = pg_writer
    first, second, third = row(), row(), row()

    async def go() -> None:
        await writer.begin(first)
        conn = writer._loop_pg._conn  # type: ignore[union-attr]
        with db.engine.connect() as admin:  # the server ends the loop's session (a restart, a failover)
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": conn.pgconn.backend_pid})
        await writer.begin(second)  # fails on the loop, committed by the thread: the caller never knows
        assert writer.stats.handed_over == 1
        await writer.begin(third)  # the loop connects again

    asyncio.run(go())
    assert pg_committed(db, [first.id, second.id, third.id]) == dict.fromkeys([first.id, second.id, third.id],
                                                                                "incomplete")
    assert writer.stats.loop_batches == 2 and writer.stats.write_errors == 0


@pytest.mark.postgres
def test_postgresql_stop_waits_for_the_batch_on_the_loop(pg_module_url: str) -> None:
    """The loop's statement waits on a lock another session holds; stop() (from another thread, as
    the gateway stops) returns only once that batch has landed."""
    db = Database(pg_module_url)
    writer = AuditWriter(db)
    writer.start()
    locker = db.engine.connect()
    locker.execute(sa.text("LOCK TABLE audit_log IN EXCLUSIVE MODE"))  # inserts wait for this transaction
    r = row()
    loop = asyncio.new_event_loop()
    ran = threading.Thread(target=loop.run_until_complete, args=(writer.begin(r),))
    try:
        ran.start()
        assert wait_until(lambda: not writer._idle.is_set(), timeout=5)
        stopped = threading.Thread(target=writer.stop)
        stopped.start()
        time.sleep(0.3)
        assert stopped.is_alive(), "stop() returned with a batch still in flight"
        locker.rollback()
        stopped.join(10)
        ran.join(10)
        assert not stopped.is_alive() and not ran.is_alive()
        assert pg_committed(db, [r.id]) == {r.id: "incomplete"}
        assert writer.stats.handed_over == 0
    finally:
        locker.close()
        writer.stop()
        loop.close()
        db.close()


@pytest.mark.postgres
def test_postgresql_a_batch_whose_answer_was_lost_is_not_settled_twice(
        pg_writer: tuple[AuditWriter, Database], monkeypatch: pytest.MonkeyPatch) -> None:
    writer, db = pg_writer
    assert writer._loop_pg is not None
    _lost_answer_case(writer, db, monkeypatch, writer._loop_pg, "write")


def test_postgresql_a_store_that_never_answers_costs_a_waiting_request_one_connect_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and never answers (a hung host): the loop's connect times
    out, and the waiting request is refused then, not after the thread's own connect timeouts too."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel accepts; nobody ever answers the startup packet
    monkeypatch.setitem(store_module.PG_CONNECT_ARGS, "connect_timeout", 2)
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{listener.getsockname()[1]}/nowhere")
    writer = AuditWriter(db)
    writer.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(AuditUnavailable):
            asyncio.run(writer.begin(row()))
        took = time.monotonic() - t0
        assert 1.5 < took < 3.5, f"refused after {took:.1f} s"
        assert not writer.healthy and writer.stats.handed_over == 0
    finally:
        writer.stop(timeout=1)
        db.close()
        listener.close()
