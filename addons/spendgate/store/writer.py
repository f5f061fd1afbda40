"""The audit writer: commits rows in groups.

A request about to go upstream awaits only its own row, taken with its rate count and its caps'
reservation in one commit (`begin`; `reserve` again only when an output limit is lowered);
a finished request is one `Finished` item (its row's completion, its budget settlement and its
captured content), so all three are committed in one transaction or not at all. While one batch
commits, the next one gathers, so throughput grows with load instead of per-row fsyncs.

Where: on SQLite, a batch is committed on the event loop itself, once per loop iteration (a
WAL append without fsync, ~0.1-0.3 ms): handing it to a thread cost more CPU than the commit.
That commit never waits: a locked database, a failure, or a store marked unhealthy hands the
batch to the writer thread, which waits, retries, isolates bad rows and checkpoints the WAL.
On PostgreSQL (a network round trip) every batch goes through the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from spendgate.store import Database, sqlite_path
from spendgate.store.audit import AuditRow
from spendgate.store.batches import Begin, Begun, Finished, Item, salvage, write_batch
from spendgate.store.budgets import ReserveRequest, ReserveResult
from spendgate.store.plain import Link, Prepared
from spendgate.store.ratelimits import RateCheck

__all__ = ["AuditStats", "AuditUnavailable", "AuditWriter", "Begun", "Finished"]

log = logging.getLogger(__name__)

MAX_BATCH = 500
LINGER_SECONDS = 0.01  # how long a batch with no waiting request may gather more rows
RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)
CHECKPOINT_SECONDS = 0.25  # SQLite: how often an idle writer thread checkpoints the WAL the loop writes
CHECKPOINT_ROUNDS = 4  # passes in a row while the loop keeps appending
WAL_RESTART, WAL_LIMIT = 64 << 20, 256 << 20  # restart a WAL this full; truncate a WAL file this large
_FRAME_BYTES = 4096 + 24  # a WAL frame: a page (SQLite's default size, which the gateway keeps) and its header
# The loop's SQLite connection: a locked database is handed to the thread at once, never waited for.
LOOP_PRAGMAS = ("PRAGMA busy_timeout=0", "PRAGMA wal_autocheckpoint=0")
_CHECKPOINT = Prepared("PRAGMA wal_checkpoint(PASSIVE)")
_RESTART, _TRUNCATE = Prepared("PRAGMA wal_checkpoint(RESTART)"), Prepared("PRAGMA wal_checkpoint(TRUNCATE)")
THREAD_PRAGMAS: tuple[str, ...] = ()  # the thread waits the store's own busy timeout (30 s on SQLite)


@dataclass
class AuditStats:
    committed_rows: int = 0
    batches: int = 0
    write_errors: int = 0
    loop_batches: int = 0  # committed on the event loop (SQLite)
    handed_over: int = 0  # items the loop could not commit, written by the thread
    last_error: str | None = None
    on_error: list[Callable[[str], None]] = field(default_factory=list)


class AuditWriter:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._link = db.link(THREAD_PRAGMAS)  # the writer thread's own connection: no pool checkout per batch
        self._on_loop = db.is_sqlite
        self._loop_link = db.link(LOOP_PRAGMAS)
        self._loop_batch: list[Item] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._flush_at: asyncio.Handle | None = None
        self._flush_urgent = False
        self._q: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self.stats = AuditStats()
        self.healthy = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spendgate-audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what is queued, then stop."""
        if self._thread is None:
            return
        self._drain()
        self._q.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._link.close()
            self._loop_link.close()
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return self._pending

    # -- producers (event loop) -----------------------------------------------

    async def begin(self, row: AuditRow, rate: RateCheck | None = None,
                    reserve: ReserveRequest | None = None) -> Begun:
        """Insert the "did it happen" row and wait until it is committed. Raises if it cannot be.
        With `rate`, the key's request is counted in the same commit, and with `reserve` its
        estimate is held against its caps there: the result says if it may go."""
        result = await self._wait(Item("begin", Begin(row, rate, reserve)))
        return result if isinstance(result, Begun) else Begun()

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Hold a request's estimate against its caps, committed with this batch. Raises if it cannot be."""
        result: ReserveResult = await self._wait(Item("reserve", request))
        return result

    def finish(self, finished: Finished) -> None:
        """Queue a finished request: never waited for."""
        self._put(Item("finish", finished))

    async def _wait(self, item: Item) -> Any:
        loop = asyncio.get_running_loop()
        item.done, item.loop = loop.create_future(), loop
        self._put(item)
        return await item.done

    def _put(self, item: Item) -> None:
        with self._lock:
            self._pending += 1
        if self._on_loop and self.healthy:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._put_on_loop(loop, item)
                return
        self._q.put(item)

    def _put_on_loop(self, loop: asyncio.AbstractEventLoop, item: Item) -> None:
        """SQLite: commit on the event loop, once per loop iteration for the requests waiting (and
        after LINGER_SECONDS for completions alone). No thread hand-over, no GIL ping-pong; the
        commit is bounded (no busy wait, no checkpoint, both left to the writer thread)."""
        if self._flush_at is not None and self._batch_loop is not loop:
            self._drain()  # a batch left on a loop that is gone (tests run many loops)
        self._loop_batch.append(item)
        self._batch_loop = loop
        urgent = item.done is not None
        if self._flush_at is None:
            self._flush_at = loop.call_soon(self._flush) if urgent else loop.call_later(LINGER_SECONDS, self._flush)
            self._flush_urgent = urgent
        elif urgent and not self._flush_urgent:
            self._flush_at.cancel()
            self._flush_at, self._flush_urgent = loop.call_soon(self._flush), True

    def _flush(self) -> None:
        batch, self._loop_batch, self._flush_at = self._loop_batch, [], None
        if not batch:
            return
        try:
            self._write(batch, self._loop_link)
        except Exception as e:
            # Locked by another writer, or a bad row, or the store is gone: the writer thread
            # waits, retries, isolates and salvages (and counts the error if it persists).
            log.debug("audit: commit on the event loop failed (%s); handed to the writer thread", type(e).__name__)
            self.stats.handed_over += len(batch)
            for item in batch:
                self._q.put(item)
            return
        self.stats.loop_batches += 1
        self._committed(batch, on_loop=True)

    def _drain(self) -> None:
        """Hand what waits for a flush on the loop to the writer thread."""
        if self._flush_at is not None:
            self._flush_at.cancel()
        batch, self._loop_batch, self._flush_at = self._loop_batch, [], None
        for item in batch:
            self._q.put(item)

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        stopping = False
        retry: list[Item] = []
        while not (stopping and not retry):
            batch = retry
            retry = []
            if not batch:
                try:
                    first = self._q.get(timeout=CHECKPOINT_SECONDS if self._on_loop else None)
                except queue.Empty:
                    self._checkpoint()
                    continue
                if first is None:
                    stopping = True
                else:
                    batch.append(first)
            # Nobody waits on completions: let them linger briefly so they share the commit of the
            # next request's begin row (one commit per request instead of two at low concurrency).
            linger_until = time.monotonic() + LINGER_SECONDS
            while len(batch) < MAX_BATCH:
                urgent = stopping or any(i.done is not None for i in batch)
                left = 0.0 if urgent else linger_until - time.monotonic()
                try:
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    continue
                batch.append(nxt)
            if not batch:
                continue
            retry = self._commit(batch)
            if retry:
                delay = RETRY_DELAYS[min(max(i.attempts for i in retry) - 1, len(RETRY_DELAYS) - 1)]
                if stopping and max(i.attempts for i in retry) >= len(RETRY_DELAYS):
                    log.error("audit: dropping %d rows after repeated failures at shutdown", len(retry))
                    break
                deadline = time.monotonic() + delay
                while not stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        nxt = self._q.get(timeout=left)
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    if nxt.done is None:
                        retry.append(nxt)
                        continue
                    rest = self._commit([nxt])
                    retry.extend(rest)
                    if self.healthy:
                        break

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file: the loop's connection never does (it would fsync there).

        A pass copies the frames there were when it began; the WAL restarts (instead of growing
        without end: 1.3 GB after 50,000 requests) only after a pass that leaves none, which under
        steady load (a pass ends with an fsync) is rare. So a WAL past WAL_RESTART is restarted here,
        writers waiting a few ms (their batches come to this thread), and a file a burst left past
        WAL_LIMIT is truncated. Never on the loop."""
        if not self._on_loop:
            return
        try:
            with self._link.transaction() as conn:
                for _ in range(CHECKPOINT_ROUNDS):
                    busy, frames, copied = conn.execute(_CHECKPOINT).one()
                    if busy or copied >= frames:
                        break
                if self._wal_bytes() > WAL_LIMIT:
                    conn.execute(_TRUNCATE)
                elif frames * _FRAME_BYTES > WAL_RESTART:
                    conn.execute(_RESTART)
        except Exception as e:
            log.debug("audit: WAL checkpoint failed (%s)", type(e).__name__)

    def _wal_bytes(self) -> int:
        path = sqlite_path(self._db.url)
        wal = path.with_name(path.name + "-wal") if path is not None else None
        return wal.stat().st_size if wal is not None and wal.exists() else 0

    def _store_alive(self) -> bool:
        try:
            self._db.ping()
            return True
        except Exception:
            return False

    def _write(self, batch: list[Item], link: Link | None = None) -> None:
        write_batch(link or self._link, batch)

    def _commit(self, batch: list[Item]) -> list[Item]:
        """Commit a batch; returns the items to try again later (the store is down)."""
        try:
            self._write(batch)
        except Exception as e:
            if not _locked(e) and self._store_alive():
                # The store answers, so some row is bad: one row must not cost the others theirs.
                return self._isolate(batch, e)
            return self._store_down(batch, e)
        self._committed(batch)
        return []

    def _committed(self, batch: list[Item], on_loop: bool = False) -> None:
        if not self.healthy:
            log.info("audit: writes succeed again")
        self.healthy = True
        self.stats.committed_rows += len(batch)
        self.stats.batches += 1
        with self._lock:
            self._pending -= len(batch)
        if on_loop:
            for item in batch:
                if item.done is not None and not item.done.done():
                    item.done.set_result(item.result)
            return
        self._resolve_all([i for i in batch if i.done is not None], None)

    def _store_down(self, batch: list[Item], e: Exception) -> list[Item]:
        self._count_error(e)
        if self.healthy:
            log.error("audit: write failed (%s); retrying", type(e).__name__)
        self.healthy = False
        keep: list[Item] = []
        for item in batch:
            item.attempts += 1
            if item.done is None:
                keep.append(item)
        # A request waiting for its row must not wait for a dead store: fail it now.
        waiting = [i for i in batch if i.done is not None]
        self._resolve_all(waiting, e)
        with self._lock:
            self._pending -= len(waiting)
        return keep

    def _count_error(self, e: Exception) -> None:
        self.stats.write_errors += 1
        self.stats.last_error = type(e).__name__
        for cb in self.stats.on_error:
            cb(type(e).__name__)

    def _isolate(self, batch: list[Item], first: Exception) -> list[Item]:
        """Commit the batch's items one by one; a row the store still rejects is written without
        the fields it rejects (and says so), never dropped."""
        self._count_error(first)
        for n, item in enumerate(batch):
            try:
                self._write([item])
            except Exception as e:
                if _locked(e):
                    return self._store_down(batch[n:], e)
                try:
                    salvaged = self._write_salvaged(item, e)
                except Exception as e2:
                    if not self._store_alive():
                        return self._store_down(batch[n:], e2)
                    log.error("audit: the store rejects a %s item even without its optional fields (%s; request %s)",
                              item.kind, type(e2).__name__, item.request_id)
                    self._count_error(e2)
                    with self._lock:
                        self._pending -= 1
                    if item.done is not None:
                        self._resolve_all([item], e2)
                    continue
                log.error("audit: a %s row was rejected by the store (%s); written without its optional fields "
                          "(request %s)", item.kind, type(e).__name__, item.request_id)
                item.result = salvaged.result
            self._committed([item])
        return []

    def _write_salvaged(self, item: Item, e: Exception) -> Item:
        """Write the first of the item's ever barer versions the store takes; raises if it takes none."""
        last: Exception = e
        for salvaged in salvage(item, e):
            try:
                self._write([salvaged])
                return salvaged
            except Exception as e2:
                last = e2
        raise last

    @staticmethod
    def _resolve_all(items: list[Item], exc: BaseException | None) -> None:
        """Wake each waiting request: one hand-over per event loop per batch, not one per row."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Item]] = {}
        for item in items:
            assert item.loop is not None
            by_loop.setdefault(item.loop, []).append(item)

        for loop, waiting in by_loop.items():
            def _set(waiting: list[Item] = waiting) -> None:
                for item in waiting:
                    fut = item.done
                    if fut is None or fut.done():
                        continue
                    if exc is None:
                        fut.set_result(item.result)
                    else:
                        fut.set_exception(AuditUnavailable(type(exc).__name__))

            try:
                loop.call_soon_threadsafe(_set)
            except RuntimeError:  # loop closed during shutdown
                pass


def _locked(e: BaseException) -> bool:
    """SQLite's busy timeout ran out: another connection holds the write lock. The store is busy,
    not the rows bad: retried like a store that is down, never isolated and salvaged."""
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)


class AuditUnavailable(RuntimeError):
    """The audit row could not be committed; the request must not go upstream."""
