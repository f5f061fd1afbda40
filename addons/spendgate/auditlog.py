"""The audit writer: a background thread that commits rows in groups.

A request about to go upstream awaits only its own row's commit (`begin`); completions,
refusals and captured content are queued and never waited for. While one batch commits,
the next one gathers, so throughput grows with load instead of per-row fsyncs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from spendgate.store import ReserveRequest, ReserveResult, Store

log = logging.getLogger("spendgate.audit")

MAX_BATCH = 500
LINGER_SECONDS = 0.01  # how long a batch with no waiting request may gather more rows
RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


@dataclass
class _Item:
    kind: str  # insert | update | content | settle | reserve
    row: dict[str, Any]
    done: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    attempts: int = 0
    result: Any = None


@dataclass
class AuditStats:
    committed_rows: int = 0
    batches: int = 0
    write_errors: int = 0
    last_error: str | None = None
    on_error: list[Callable[[str], None]] = field(default_factory=list)


class AuditWriter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
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
        self._q.put(None)
        self._thread.join(timeout)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return self._pending

    # -- producers (event loop) -----------------------------------------------

    async def begin(self, row: dict[str, Any]) -> None:
        """Insert the "did it happen" row and wait until it is committed. Raises if it cannot be."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._put(_Item("insert", row, fut, loop))
        await fut

    def insert(self, row: dict[str, Any]) -> None:
        self._put(_Item("insert", row))

    def update(self, row: dict[str, Any]) -> None:
        self._put(_Item("update", row))

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Hold a request's estimate against its caps, committed with this batch. Raises if it cannot be."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ReserveResult] = loop.create_future()
        self._put(_Item("reserve", {"request": request}, fut, loop))
        return await fut

    def content(self, row: dict[str, Any]) -> None:
        self._put(_Item("content", row))

    def settle(self, row: dict[str, Any]) -> None:
        """{"request_id", "refs", "actual_nusd"}: committed with the audit completion it follows."""
        self._put(_Item("settle", row))

    def _put(self, item: _Item) -> None:
        with self._lock:
            self._pending += 1
        self._q.put(item)

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        stopping = False
        retry: list[_Item] = []
        while not (stopping and not retry):
            batch = retry
            retry = []
            if not batch:
                first = self._q.get()
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

    def _store_alive(self) -> bool:
        try:
            self._store.ping()
            return True
        except Exception:
            return False

    def _write(self, batch: list[_Item]) -> None:
        inserts = [i.row for i in batch if i.kind == "insert"]
        updates = [i.row for i in batch if i.kind == "update"]
        contents = [i.row for i in batch if i.kind == "content"]
        settles = [i.row for i in batch if i.kind == "settle"]
        reserve_items = [i for i in batch if i.kind == "reserve"]
        results = self._store.write_audit_batch(
            inserts, updates, contents, settles, [i.row["request"] for i in reserve_items]
        )
        for item, result in zip(reserve_items, results):
            item.result = result

    def _commit(self, batch: list[_Item]) -> list[_Item]:
        """Commit a batch; returns the items to try again later (the store is down)."""
        try:
            self._write(batch)
        except Exception as e:
            if self._store_alive():
                # The store answers, so some row is bad: one row must not cost the others theirs.
                return self._isolate(batch, e)
            return self._store_down(batch, e)
        self._committed(batch)
        return []

    def _committed(self, batch: list[_Item]) -> None:
        if not self.healthy:
            log.info("audit: writes succeed again")
        self.healthy = True
        self.stats.committed_rows += len(batch)
        self.stats.batches += 1
        with self._lock:
            self._pending -= len(batch)
        self._resolve_all([i for i in batch if i.done is not None], None)

    def _store_down(self, batch: list[_Item], e: Exception) -> list[_Item]:
        self._count_error(e)
        if self.healthy:
            log.error("audit: write failed (%s); retrying", type(e).__name__)
        self.healthy = False
        keep: list[_Item] = []
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

    def _isolate(self, batch: list[_Item], first: Exception) -> list[_Item]:
        """Commit the batch's items one by one; a row the store still rejects is written without
        the fields it rejects (and says so), never dropped."""
        self._count_error(first)
        for n, item in enumerate(batch):
            try:
                self._write([item])
            except Exception as e:
                salvaged = _salvage(item, e)
                try:
                    if salvaged is None:
                        raise
                    self._write([salvaged])
                except Exception as e2:
                    if not self._store_alive():
                        return self._store_down(batch[n:], e2)
                    log.error("audit: the store rejects a %s item even without its optional fields (%s; request %s)",
                              item.kind, type(e2).__name__, item.row.get("id") or item.row.get("request_id"))
                    self._count_error(e2)
                    with self._lock:
                        self._pending -= 1
                    if item.done is not None:
                        self._resolve_all([item], e2)
                    continue
                log.error("audit: a %s row was rejected by the store (%s); written without its optional fields "
                          "(request %s)", item.kind, type(e).__name__, item.row.get("id") or item.row.get("request_id"))
                item.result = salvaged.result
            self._committed([item])
        return []

    @staticmethod
    def _resolve_all(items: list[_Item], exc: BaseException | None) -> None:
        """Wake each waiting request: one hand-over per event loop per batch, not one per row."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for item in items:
            assert item.loop is not None
            by_loop.setdefault(item.loop, []).append(item)

        for loop, waiting in by_loop.items():
            def _set(waiting: list[_Item] = waiting) -> None:
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


# The columns an audit row cannot do without; other text may be nulled to save the row.
_REQUIRED = frozenset({"id", "started_at", "provider", "host", "method", "path", "endpoint_kind", "outcome", "instance_id"})


def _salvage(item: _Item, e: Exception) -> _Item | None:
    """The item with its free-text fields nulled and the reason in `error`; None if nothing can be dropped."""
    if item.kind in ("insert", "update"):
        row = {k: (None if isinstance(v, str) and k not in _REQUIRED else v) for k, v in item.row.items()}
        for k in _REQUIRED & row.keys():
            value = row[k]
            if isinstance(value, str):
                row[k] = value.encode("ascii", "replace").decode().replace("\x00", "")[: 16 if k == "method" else 200]
        row["error"] = f"audit fields rejected by the store ({type(e).__name__}); they were left out"
        return _Item(item.kind, row, item.done, item.loop, item.attempts)
    if item.kind == "content":
        row = dict(item.row, request_body=None, response_body=None,
                   reason=f"{str(item.row.get('reason', ''))[:200]} (content rejected by the store: {type(e).__name__})")
        return _Item(item.kind, row, item.done, item.loop, item.attempts)
    return None


class AuditUnavailable(RuntimeError):
    """The audit row could not be committed; the request must not go upstream."""
