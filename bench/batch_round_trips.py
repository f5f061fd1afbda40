"""CPU of one audit-writer batch at concurrency 1, called directly (no thread, no loop).

The batch a capped request leaves at c=1: the previous request's completion with its settlement,
and this request's begin row with its reservation against one cap (`batches.write_batch` on the
writer's `Link`). On PostgreSQL nearly all of it is round trips (~45 µs of client CPU each),
which is why it is measured here apart from the whole gateway.

    .venv/bin/python -O bench/batch_round_trips.py                 # PostgreSQL (a throwaway database)
    .venv/bin/python -O bench/batch_round_trips.py --database sqlite
    .venv/bin/python -O bench/batch_round_trips.py --idle-ms 0 2 5  # the same batch after idle gaps

`--idle-ms`: the same batches, each after the machine sat idle that long, as at c=1 where a
request's batch follows a wait on the client and the provider. On this VM an idle vCPU is slow to
come back: the same batch then costs more CPU and wall time, in the gateway and (PostgreSQL, the
function's own time from `pg_stat_user_functions`) in the server.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_writer import begin_row, completed_row, pg_database  # noqa: E402

from spendgate.store.plain import Prepared  # noqa: E402

_TRACK = Prepared("SET track_functions = 'pl'")
_FLUSH = Prepared("SELECT pg_stat_force_next_flush()")
_SPENT = Prepared("SELECT sum(total_time) AS ms FROM pg_stat_user_functions WHERE funcname = 'spendgate_write_batch'")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--idle-ms", type=float, nargs="+", default=[0.0], help="sleep before each batch")
    args = ap.parse_args()
    if args.database == "sqlite":
        url = f"sqlite:///{tempfile.mkdtemp()}/audit.db"
        run(url, args.batches, args.idle_ms)
    else:
        with pg_database() as url:
            if url is not None:
                run(url, args.batches, args.idle_ms)


def run(url: str, batches: int, idle_ms: list[float]) -> None:
    from sqlmodel import Session

    from spendgate.store import Database
    from spendgate.store.batches import Begin, Finished, Item, write_batch
    from spendgate.store.budgets import BudgetDef, ReserveRequest, Settlement
    from spendgate.store.models import Budget

    db = Database(url)
    db.upgrade()
    now = datetime.now(UTC)
    with Session(db.engine) as s:
        b = Budget(scope="user", name="bench", period="month", cap_nusd=10**15, created_at=now, updated_at=now)
        s.add(b)
        s.commit()
        cap = BudgetDef(int(b.id or 0), "user", "bench", "month", 10**15)
    link = db.link(())
    prev: list = []

    def one(i: int) -> None:
        row = begin_row(i)
        items = [Item("begin", Begin(row, None, ReserveRequest(row.id, (cap,), 1000, datetime.now(UTC),
                                                                timedelta(minutes=10))))]
        if prev:
            prow, refs = prev.pop()
            items.insert(0, Item("finish", Finished(completed_row(prow, i), True, Settlement(prow.id, refs, 900))))
        write_batch(link, items)
        prev.append((row, items[-1].result.reserved.refs))

    for i in range(200):
        one(i)
    n = 200
    for idle in idle_ms:
        server = _server_ms(link)
        cpu = wall = 0.0
        for i in range(n, n + batches):
            time.sleep(idle / 1000)
            c0, t0 = time.thread_time(), time.perf_counter()
            one(i)
            cpu, wall = cpu + time.thread_time() - c0, wall + time.perf_counter() - t0
        n += batches
        spent = _server_ms(link)
        print(f"{url.split(':')[0]}, {idle:g} ms idle before each: {cpu / batches * 1e6:.0f} µs CPU / "
              f"{wall / batches * 1e6:.0f} µs wall per batch"
              + (f" ({(spent - server) / batches * 1000:.0f} µs of it in the server's function)" if spent else ""))
    c0, t0 = time.thread_time(), time.perf_counter()
    for i in range(n, n + batches):
        one(i)
    cpu, wall = (time.thread_time() - c0) / batches * 1e6, (time.perf_counter() - t0) / batches * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n + batches, n + batches + 200):
        one(i)
    prof.disable()
    waits = sum(v[0] for k, v in pstats.Stats(prof).stats.items()  # type: ignore[attr-defined]
                if k[2] == "wait" and "psycopg" in k[0]) / 200
    print(f"{url.split(':')[0]}: {cpu:.0f} µs CPU / {wall:.0f} µs wall per batch"
          + (f"; {waits:.1f} psycopg waits (round trips) per batch" if waits else ""))
    link.close()
    db.close()


def _server_ms(link: Any) -> float:
    """PostgreSQL: ms the server has spent in `spendgate_write_batch` on this session's database (0 on SQLite)."""
    if link.sqlite:
        return 0.0
    with link.statement() as conn:
        conn.execute(_TRACK)
        conn.execute(_FLUSH)
        time.sleep(1.1)  # the statistics collector's view is at most a second old
        row = conn.execute(_SPENT).first()
    return float(row.ms) if row is not None and row.ms is not None else 0.0


if __name__ == "__main__":
    main()
