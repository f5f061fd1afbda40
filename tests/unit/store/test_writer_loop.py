"""The audit writer's SQLite commits on the event loop (`spendgate.store.writer`): a waiting
request's row is committed there with no thread hand-over, a locked database never blocks the
loop (the batch goes to the writer thread, which waits for the lock), completions left behind
by a loop that is gone still land, and the WAL the loop writes is checkpointed by the thread."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from spendgate.store.writer import AuditWriter, Finished
from tests.unit.store.test_writer import committed, completed, row, wait_until


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
