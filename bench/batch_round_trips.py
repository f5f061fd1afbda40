"""CPU of one audit-writer batch at concurrency 1, called directly (no thread, no loop).

The batch a capped request leaves at c=1: the previous request's completion with its settlement,
and this request's begin row with its reservation against one cap (`batches.write_batch` on the
writer's `Link`). On PostgreSQL nearly all of it is round trips (~45 µs of client CPU each),
which is why it is measured here apart from the whole gateway.

    .venv/bin/python -O bench/batch_round_trips.py                 # PostgreSQL (a throwaway database)
    .venv/bin/python -O bench/batch_round_trips.py --database sqlite
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_writer import begin_row, completed_row, pg_database  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--batches", type=int, default=1000)
    args = ap.parse_args()
    if args.database == "sqlite":
        url = f"sqlite:///{tempfile.mkdtemp()}/audit.db"
        run(url, args.batches)
    else:
        with pg_database() as url:
            if url is not None:
                run(url, args.batches)


def run(url: str, batches: int) -> None:
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
    c0, t0 = time.thread_time(), time.perf_counter()
    for i in range(200, 200 + batches):
        one(i)
    cpu, wall = (time.thread_time() - c0) / batches * 1e6, (time.perf_counter() - t0) / batches * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for i in range(200 + batches, 400 + batches):
        one(i)
    prof.disable()
    waits = sum(v[0] for k, v in pstats.Stats(prof).stats.items()  # type: ignore[attr-defined]
                if k[2] == "wait" and "psycopg" in k[0]) / 200
    print(f"{url.split(':')[0]}: {cpu:.0f} µs CPU / {wall:.0f} µs wall per batch"
          + (f"; {waits:.1f} psycopg waits (round trips) per batch" if waits else ""))
    link.close()
    db.close()


if __name__ == "__main__":
    main()
