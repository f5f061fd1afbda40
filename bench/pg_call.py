"""Gateway CPU of one PostgreSQL audit batch awaited on the event loop: psycopg's async cursor vs `pgloop`.

The batch a capped request leaves at c=1 (the previous request's completion and settlement, this
request's begin row and reservation), one `spendgate_write_batch` call each, alternating the two
clients in blocks on one throwaway database. `pgloop` drives libpq itself (a prepared statement,
the socket watched only until the answer is read); the other is what it replaced:
`await (await conn.execute(sql, params)).fetchone()` on a `psycopg.AsyncConnection`.

    .venv/bin/python -O bench/pg_call.py [--batches 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_writer import begin_row, completed_row, pg_database  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with pg_database() as url:
        if url is not None:
            asyncio.run(run(url, args.batches, args.rounds))


async def run(url: str, batches: int, rounds: int) -> None:
    import psycopg
    from sqlmodel import Session

    from spendgate.store import PG_CONNECT_ARGS, Database
    from spendgate.store.batches import Begin, Finished, Item, pg_call
    from spendgate.store.budgets import BudgetDef, ReserveRequest, Settlement
    from spendgate.store.models import Budget
    from spendgate.store.pgloop import LoopConnection

    db = Database(url)
    db.upgrade()
    now = datetime.now(UTC)
    with Session(db.engine) as s:
        b = Budget(scope="user", name="bench", period="month", cap_nusd=10**15, created_at=now, updated_at=now)
        s.add(b)
        s.commit()
        cap = BudgetDef(int(b.id or 0), "user", "bench", "month", 10**15)
    conninfo = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    cursor_conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **PG_CONNECT_ARGS)
    loop_conn = LoopConnection(db)
    prev: list[Any] = []
    n = 0

    def items() -> list[Item]:
        nonlocal n
        n += 1
        row = begin_row(n)
        out = [Item("begin", Begin(row, None, ReserveRequest(row.id, (cap,), 1000, datetime.now(UTC),
                                                            timedelta(minutes=10))))]
        if prev:
            prow, refs = prev.pop()
            out.insert(0, Item("finish", Finished(completed_row(prow, n), True, Settlement(prow.id, refs, 900))))
        return out

    async def via_cursor(batch: list[Item]) -> None:
        call, settle = pg_call(batch)
        cur = await cursor_conn.execute("SELECT spendgate_write_batch(CAST(%(batch)s AS jsonb))", {"batch": call.json})
        row = await cur.fetchone()
        assert row is not None
        settle(row[0])

    clients = {"psycopg cursor": via_cursor, "pgloop": loop_conn.write}
    cpu: dict[str, list[float]] = {k: [] for k in clients}
    wall: dict[str, list[float]] = {k: [] for k in clients}
    for r in range(rounds + 1):  # round 0 warms both up
        for name, write in clients.items() if r % 2 else reversed(clients.items()):
            took = spent = 0.0
            for _ in range(batches):
                batch = items()
                c0, t0 = time.thread_time(), time.perf_counter()
                await write(batch)
                spent, took = spent + time.thread_time() - c0, took + time.perf_counter() - t0
                prev.append((batch[-1].payload.row, batch[-1].result.reserved.refs))
            if r:
                cpu[name].append(spent / batches * 1e6)
                wall[name].append(took / batches * 1e6)
    print(f"one batch (a completion + a begin with its reservation), {batches} per block, {rounds} rounds:")
    for name in clients:
        print(f"  {name:15s} {statistics.median(cpu[name]):5.0f} µs CPU [{min(cpu[name]):.0f}-{max(cpu[name]):.0f}]"
              f"  {statistics.median(wall[name]):5.0f} µs wall [{min(wall[name]):.0f}-{max(wall[name]):.0f}]")
    await cursor_conn.close()
    loop_conn.close()
    db.close()


if __name__ == "__main__":
    main()
