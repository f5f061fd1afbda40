"""The audit writer: commits rows in groups.

A request about to go upstream awaits only its own row, taken with its rate count and its caps'
reservation in one commit (`begin`; `reserve` again only when an output limit is lowered);
a finished request is one `Finished` item (its row's completion, its budget settlement and its
captured content), so all three are committed in one transaction or not at all. While one batch
commits, the next one gathers, so throughput grows with load instead of per-row fsyncs.

Where: on the event loop, gathered once per loop iteration. On SQLite the batch is committed
there (a WAL append without fsync, ~0.1-0.3 ms): handing it to a thread cost more CPU than the
commit. On PostgreSQL its one statement is awaited there (`pgloop`), one batch in flight at a time.
Neither waits for a lock: a locked database, a failure, or a store marked unhealthy hands the
batch to the writer thread, which waits, retries, isolates bad rows and checkpoints the WAL (`wal`).
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

from spendgate.store import Database, sqlite_path, wal
from spendgate.store.audit import AuditRow
from spendgate.store.batches import AuditUnavailable, Begin, Begun, Finished, Item, resolve, salvage, write_batch
from spendgate.store.budgets import ReserveRequest, ReserveResult
from spendgate.store.pgloop import LoopConnection, Unreachable
from spendgate.store.plain import Link
from spendgate.store.ratelimits import RateCheck

__all__ = ["AuditStats", "AuditUnavailable", "AuditWriter", "Begun", "Finished"]

log = logging.getLogger(__name__)

MAX_BATCH = 500
LINGER_SECONDS = 0.01  # how long a batch with no waiting request may gather more rows
RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)
# The loop's SQLite connection: a locked database is handed to the thread at once, never waited for.
LOOP_PRAGMAS = ("PRAGMA busy_timeout=0", "PRAGMA wal_autocheckpoint=0")
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
        self._sqlite = db.is_sqlite
        self._loop_link = db.link(LOOP_PRAGMAS)  # SQLite's on the loop
        self._loop_pg = None if db.is_sqlite else LoopConnection(db)
        self._idle = threading.Event()  # PostgreSQL: no batch awaited on the loop (stop waits for it)
        self._idle.set()
        self._loop_thread = 0
        self._loop_batch: list[Item] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._flush_at: asyncio.Handle | None = None
        self._flush_urgent = False
        self._q: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpoint_due = wal.Due()
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
        if not self._idle.is_set() and self._loop_thread != threading.get_ident():
            self._idle.wait(timeout)  # PostgreSQL: the batch on the loop lands (or comes to the thread)
        self._drain()
        self._q.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._link.close()
            self._loop_link.close()
            if self._loop_pg is not None:
                self._loop_pg.close()
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
        if self.healthy:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._put_on_loop(loop, item)
                return
        self._q.put(item)

    def _put_on_loop(self, loop: asyncio.AbstractEventLoop, item: Item) -> None:
        """Commit on the event loop, once per loop iteration for the requests waiting (and after
        LINGER_SECONDS for completions alone). No thread hand-over, no GIL ping-pong; the commit is
        bounded (no busy wait, no checkpoint, both left to the writer thread)."""
        if self._flush_at is not None and self._batch_loop is not loop:
            self._drain()  # a batch left on a loop that is gone (tests run many loops)
        self._loop_batch.append(item)
        self._batch_loop = loop
        self._schedule(loop, item.done is not None)

    def _schedule(self, loop: asyncio.AbstractEventLoop, urgent: bool) -> None:
        if self._flush_at is None:
            self._flush_at = loop.call_soon(self._flush) if urgent else loop.call_later(LINGER_SECONDS, self._flush)
            self._flush_urgent = urgent
        elif urgent and not self._flush_urgent:
            self._flush_at.cancel()
            self._flush_at, self._flush_urgent = loop.call_soon(self._flush), True

    def _flush(self) -> None:
        if self._loop_pg is not None:
            self._flush_at = None
            if self._idle.is_set() and self._loop_batch:  # else the batch in flight flushes again when done
                batch, self._loop_batch = self._loop_batch[:MAX_BATCH], self._loop_batch[MAX_BATCH:]
                self._idle.clear()
                self._loop_thread = threading.get_ident()
                asyncio.get_running_loop().create_task(self._flush_pg(batch))
            return
        batch, self._loop_batch, self._flush_at = self._loop_batch, [], None
        if not batch:
            return
        try:
            self._write(batch, self._loop_link)
        except Exception as e:
            self._hand_over(batch, e)
            return
        self.stats.loop_batches += 1
        self._committed(batch, on_loop=True)

    async def _flush_pg(self, batch: list[Item]) -> None:
        """PostgreSQL: one batch awaited on the loop (`pgloop`); what it could not write goes to the thread."""
        assert self._loop_pg is not None
        try:
            await self._loop_pg.write(batch)
        except Unreachable as e:  # the store is down: waiting requests are refused now, the rest retried
            for item in self._store_down(batch, e):
                self._q.put(item)
        except BaseException as e:  # cancelled too (its loop is ending): the thread still writes the batch
            self._hand_over(batch, e)
            if not isinstance(e, Exception):
                raise
        else:
            self.stats.loop_batches += 1
            self._committed(batch, on_loop=True)
        finally:
            self._idle.set()
            if self._loop_batch:  # gathered meanwhile: flush now if a request waits, else when it lingered
                self._schedule(asyncio.get_running_loop(), any(i.done is not None for i in self._loop_batch))

    def _hand_over(self, batch: list[Item], e: BaseException) -> None:
        """Locked by another writer, or a bad row, or the store is gone: the writer thread waits,
        retries, isolates and salvages (and counts the error if it persists)."""
        log.debug("audit: commit on the event loop failed (%s); handed to the writer thread", type(e).__name__)
        self.stats.handed_over += len(batch)
        for item in batch:
            item.doubtful = True
            self._q.put(item)

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
                    first = self._q.get(timeout=wal.CHECKPOINT_SECONDS if self._sqlite else None)
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
        """SQLite: copy the WAL the loop appends to into the database file (`wal`); never on the loop."""
        if self._sqlite and self._checkpoint_due(self.stats.batches):
            wal.checkpoint(self._link, sqlite_path(self._db.url))

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
            for item in batch:
                item.doubtful = True
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
        resolve([i for i in batch if i.done is not None], None)

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
        resolve(waiting, e)
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
                        resolve([item], e2)
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


def _locked(e: BaseException) -> bool:
    """SQLite's busy timeout ran out: another connection holds the write lock. The store is busy,
    not the rows bad: retried like a store that is down, never isolated and salvaged."""
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
