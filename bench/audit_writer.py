"""AuditWriter throughput: rows committed per second on SQLite and PostgreSQL.

N concurrent callers on one asyncio event loop (as mitmproxy's loop would be), each doing, per
request, what the Record stage does: `await writer.begin(row)` (the "did it happen" insert, waited
for) followed by `writer.finish(Finished(completed_row, begun=True))` (the completion, queued and
never waited for). The clock
stops when every begin() has returned and the writer's queue is empty.

    .venv/bin/python bench/audit_writer.py                    # 64 callers x 50 rows, SQLite then PostgreSQL
    .venv/bin/python bench/audit_writer.py --callers 32 --rows 100 --backends sqlite

PostgreSQL: a fresh database bench_<pid> on 127.0.0.1:5432 (user postgres), dropped afterwards;
skipped with a message when unreachable (override with SPENDGATE_BENCH_PG_ADMIN=postgresql://...).
Not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import cpu_seconds, machine_busy_seconds, percentile  # noqa: E402  (also puts addons/ on sys.path)

if TYPE_CHECKING:
    from spendgate.store import Database
    from spendgate.store.audit import AuditRow

PG_ADMIN = os.environ.get("SPENDGATE_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def begin_row(i: int) -> AuditRow:
    """The row Record writes before a request goes upstream."""
    from spendgate.store.audit import AuditRow

    return AuditRow(
        id=f"sgr_{uuid.uuid4().hex[:24]}",
        started_at=datetime.now(UTC),
        user=f"user{i % 20}",
        team=f"team{i % 4}",
        key_id=f"k{i % 20:07d}",
        provider="openai",
        host="api.openai.com",
        method="POST",
        path="/v1/chat/completions",
        endpoint_kind="chat",
        model_requested="gpt-4o-mini",
        stream=bool(i % 2),
        request_bytes=180 + i % 50,
        client_addr="127.0.0.1",
        user_agent="OpenAI/Python 1.99.0",
        instance_id="bench",
        outcome="incomplete",
    )


def completed_row(row: AuditRow, i: int) -> AuditRow:
    """The same row as Record completes it when the request ends (only the COMPLETION columns are written)."""
    return dataclasses.replace(
        row,
        ended_at=datetime.now(UTC),
        latency_ms=123.456,
        outcome="completed",
        status_code=200,
        error=None,
        response_bytes=1500 + i % 100,
        ttft_ms=45.6,
        input_tokens=17 + i % 30,
        output_tokens=5,
        cache_read_tokens=0,
        cache_write_tokens=0,
        reasoning_tokens=0,
        usage_source="provider",
        model_reported="gpt-4o-mini-2024-07-18",
        upstream_request_id=f"req_{i:08d}",
        cost_nusd=5550 + i,
    )


async def run_callers(writer: Any, callers: int, rows: int) -> dict[str, Any]:
    from spendgate.store.writer import Finished

    lat: list[float] = []

    async def caller(c: int) -> None:
        for j in range(rows):
            row = begin_row(c * rows + j)
            t0 = time.perf_counter()
            await writer.begin(row)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0)  # the request is "upstream" now; let other callers run
            writer.finish(Finished(completed_row(row, j), begun=True))

    b0, r0 = writer.stats.batches, writer.stats.committed_rows
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    t_begins = time.perf_counter() - t0
    while writer.queue_depth > 0:  # the completions still queued
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    lat.sort()
    batches = writer.stats.batches - b0
    items = writer.stats.committed_rows - r0
    return {
        "requests": callers * rows,
        "items": items,
        "elapsed": elapsed,
        "t_begins": t_begins,
        "batches": batches,
        "begin_p50_ms": percentile(lat, 50) * 1000,
        "begin_p99_ms": percentile(lat, 99) * 1000,
        "errors": writer.stats.write_errors,
    }


def bench_backend(name: str, url: str, configs: list[tuple[int, int]]) -> None:
    from spendgate.store import Database
    from spendgate.store.writer import AuditWriter

    store = Database(url)
    store.upgrade()
    writer = AuditWriter(store)
    writer.start()
    try:
        # warm the connection pool and SQLAlchemy's statement cache
        asyncio.run(run_callers(writer, 4, 10))
        for callers, rows in configs:
            pid = os.getpid()
            cpu0, busy0 = cpu_seconds(pid), machine_busy_seconds()
            r = asyncio.run(run_callers(writer, callers, rows))
            cpu = cpu_seconds(pid) - cpu0
            busy = machine_busy_seconds() - busy0
            other = max(0.0, busy - cpu) / (r["elapsed"] * (os.cpu_count() or 1))
            mean_batch = r["items"] / r["batches"] if r["batches"] else float("nan")
            label = f"{callers} x {rows}"
            print(f"  {name:<10} {label:<14} {r['requests'] / r['elapsed']:>7.0f} {r['items'] / r['elapsed']:>9.0f} "
                  f"{r['batches']:>7} {mean_batch:>7.1f} {r['begin_p50_ms']:>8.2f} {r['begin_p99_ms']:>8.2f} "
                  f"{cpu / r['items'] * 1e6:>8.0f} {other:>6.0%}"
                  + (f"  WRITE ERRORS {r['errors']}" if r["errors"] else ""), flush=True)
        check(store)
        transaction_costs(name, store)
    finally:
        writer.stop()
        store.close()


def transaction_costs(name: str, store: Database) -> None:
    """What one writer transaction costs, called directly (no thread, no loop): at concurrency 1 the
    gateway commits two of these per request (the begin insert, then the completion update)."""
    from spendgate.store import audit

    def write(inserts: list[AuditRow], completions: list[AuditRow]) -> None:
        with store.transaction() as conn:  # what the writer does for one batch without budget items
            audit.write(conn, inserts, completions, [])

    def per_call(inserts: int, updates: int, calls: int) -> tuple[float, float]:
        batches = []
        for c in range(calls):
            # completions name rows that are already committed, as in the gateway
            existing = [begin_row(c * 100 + i) for i in range(updates)]
            if existing:
                write(existing, [])
            batches.append(([begin_row(c * 100 + i) for i in range(inserts)],
                            [completed_row(r, i) for i, r in enumerate(existing)]))
        c0, t0 = time.process_time(), time.perf_counter()
        for rows, ups in batches:
            write(rows, ups)
        return (time.perf_counter() - t0) / calls * 1e6, (time.process_time() - c0) / calls * 1e6

    cells = []
    for label, ins, upd, calls in (("1 insert", 1, 0, 200), ("1 update", 0, 1, 200), ("32 ins + 32 upd", 32, 32, 20)):
        wall, cpu = per_call(ins, upd, calls)
        cells.append(f"{label}: {wall:.0f} µs wall / {cpu:.0f} µs CPU")
    print(f"  {'':<10} one audit.write transaction: " + "; ".join(cells))


def check(store: Database) -> None:
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        total, done = conn.execute(sa.text(
            "SELECT count(*), sum(CASE WHEN outcome = 'completed' THEN 1 ELSE 0 END) FROM audit_log")).one()
    print(f"  {'':<10} check: {total} rows in audit_log, {done} completed"
          + ("" if total == done else "  <-- MISMATCH"))


@contextmanager
def pg_database() -> Iterator[str | None]:
    from tests.rig.pg import throwaway_database

    with throwaway_database("bench", PG_ADMIN) as url:
        if url is None:
            print(f"  postgresql: skipped, not reachable at {PG_ADMIN}")
        yield url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--rows", type=int, default=50, help="requests per caller")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    args = ap.parse_args(argv)
    configs = [(1, 500), (args.callers, args.rows)]
    print(f"audit_writer: one process, one event loop + the writer thread; {os.cpu_count()} cores shared with "
          "whatever else runs (column 'other'; PostgreSQL's own backend process counts there too).")
    print("Per request: await begin(insert) then finish(completion) queued. 'rows/s' = requests whose begin "
          "row and completion are both committed, per second;")
    print("'items/s' = inserts + updates committed per second; batch = one transaction of the writer "
          "(group commit). CPU = this process's CPU µs per item.")
    print(f"load average at start: {os.getloadavg()[0]:.2f}\n")
    print(f"  {'backend':<10} {'callers x rows':<14} {'rows/s':>7} {'items/s':>9} {'batches':>7} {'items/b':>7} "
          f"{'begin50':>8} {'begin99':>8} {'CPU µs':>8} {'other':>6}")
    if "sqlite" in args.backends:
        with tempfile.TemporaryDirectory(prefix="sg-bench-audit-") as tmp:
            bench_backend("sqlite", f"sqlite:///{tmp}/audit.db", configs)
    if "postgresql" in args.backends:
        with pg_database() as url:
            if url is not None:
                bench_backend("postgresql", url, configs)
    print("\n(begin50/begin99: ms a caller waits for its own row's commit. SQLite runs WAL with "
          "synchronous=NORMAL, as the gateway configures it; PostgreSQL with its server defaults.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
