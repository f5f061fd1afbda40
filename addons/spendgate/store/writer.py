"""The audit writer: a background thread that commits rows in groups.

A request about to go upstream awaits only its own row, taken with its rate count and its caps'
reservation in one commit (`begin`; `reserve` again only when an output limit is lowered);
a finished request is one `Finished` item (its row's completion, its budget settlement and its
captured content), so all three are committed in one transaction or not at all. While one batch
commits, the next one gathers, so throughput grows with load instead of per-row fsyncs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from spendgate.store import Database, audit, budgets, ratelimits
from spendgate.store.audit import ESSENTIAL, AuditRow, ContentRow
from spendgate.store.budgets import ReserveRequest, ReserveResult, Settlement
from spendgate.store.ratelimits import RateCheck, RateResult

log = logging.getLogger(__name__)

MAX_BATCH = 500
LINGER_SECONDS = 0.01  # how long a batch with no waiting request may gather more rows
RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Finished:
    """Everything a request leaves when it ends, written in one transaction."""

    row: AuditRow
    begun: bool  # its row was inserted before it went upstream: complete it; else insert it whole
    settlement: Settlement | None = None
    content: ContentRow | None = None


@dataclass(frozen=True)
class Begin:
    """A request about to go upstream: its row, with its key's `--rpm` count and its caps'
    reservation taken in the same commit (the reservation only if the rate limit lets it go)."""

    row: AuditRow
    rate: RateCheck | None = None
    reserve: ReserveRequest | None = None


@dataclass(frozen=True)
class Begun:
    rate: RateResult | None = None
    reserved: ReserveResult | None = None


Payload = Union[Begin, Finished, ReserveRequest]


@dataclass
class _Item:
    kind: Literal["begin", "finish", "reserve"]
    payload: Payload
    done: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    attempts: int = 0
    result: Any = None

    @property
    def request_id(self) -> str:
        p = self.payload
        return p.row.id if isinstance(p, (Begin, Finished)) else p.request_id


@dataclass
class AuditStats:
    committed_rows: int = 0
    batches: int = 0
    write_errors: int = 0
    last_error: str | None = None
    on_error: list[Callable[[str], None]] = field(default_factory=list)


class AuditWriter:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._link = db.link()  # the writer thread's own connection: its batches need no pool checkout
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
        if not self._thread.is_alive():
            self._link.close()
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
        result = await self._wait(_Item("begin", Begin(row, rate, reserve)))
        return result if isinstance(result, Begun) else Begun()

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Hold a request's estimate against its caps, committed with this batch. Raises if it cannot be."""
        result: ReserveResult = await self._wait(_Item("reserve", request))
        return result

    def finish(self, finished: Finished) -> None:
        """Queue a finished request: never waited for."""
        self._put(_Item("finish", finished))

    async def _wait(self, item: _Item) -> Any:
        loop = asyncio.get_running_loop()
        item.done, item.loop = loop.create_future(), loop
        self._put(item)
        return await item.done

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
            self._db.ping()
            return True
        except Exception:
            return False

    def _write(self, batch: list[_Item]) -> None:
        inserts: list[AuditRow] = []
        completions: list[AuditRow] = []
        contents: list[ContentRow] = []
        settles: list[Settlement] = []
        reserving: list[tuple[_Item, ReserveRequest]] = []
        begins: list[_Item] = []
        for item in batch:
            p = item.payload
            if isinstance(p, Begin):
                inserts.append(p.row)
                if p.rate is not None or p.reserve is not None:
                    begins.append(item)
            elif isinstance(p, Finished):
                (completions if p.begun else inserts).append(p.row)
                if p.content is not None:
                    contents.append(p.content)
                if p.settlement is not None:
                    settles.append(p.settlement)
            else:
                reserving.append((item, p))
        with self._link.transaction() as conn:
            audit.write(conn, inserts, completions, contents)
            rates: dict[int, RateResult] = {}
            for item in sorted(begins, key=_rate_order):  # the rows' lock order, as budgets.apply's
                p = item.payload
                assert isinstance(p, Begin)
                if p.rate is not None:
                    rates[id(item)] = ratelimits.take(conn, p.rate)
                if p.reserve is not None and rates.get(id(item), _ALLOWED).allowed:
                    reserving.append((item, p.reserve))
            results: list[ReserveResult] = []
            if settles or reserving:
                results = budgets.apply(conn, settles, [r for _, r in reserving])
        reserved = {id(item): result for (item, _), result in zip(reserving, results)}
        for item in batch:
            if item.kind == "reserve":
                item.result = reserved[id(item)]
            elif item.kind == "begin":
                item.result = Begun(rates.get(id(item)), reserved.get(id(item)))

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

    def _write_salvaged(self, item: _Item, e: Exception) -> _Item:
        """Write the first of the item's ever barer versions the store takes; raises if it takes none."""
        last: Exception = e
        for salvaged in _salvage(item, e):
            try:
                self._write([salvaged])
                return salvaged
            except Exception as e2:
                last = e2
        raise last

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


_ALLOWED = RateResult(True)


def _rate_order(item: _Item) -> str:
    p = item.payload
    return p.rate.key_id if isinstance(p, Begin) and p.rate is not None else ""


def _salvage(item: _Item, e: Exception) -> list[_Item]:
    """The item without the free text the store rejects, saying so in `error`, barest last; none for a
    reservation. A finished request's content goes before its completion and settlement do: the
    content row may be what the store rejects (a conflict), and the other two must still land."""
    p = item.payload
    if isinstance(p, Begin):
        return [_Item(item.kind, Begin(_bare(p.row, e), p.rate, p.reserve), item.done, item.loop, item.attempts)]
    if isinstance(p, Finished):
        row = _bare(p.row, e)
        out = []
        if p.content is not None:
            content = dataclasses.replace(
                p.content, request_body=None, response_body=None,
                reason=f"{p.content.reason[:200]} (content rejected by the store: {type(e).__name__})")
            out.append(Finished(row, p.begun, p.settlement, content))
            row = dataclasses.replace(
                row, error=f"audit fields and captured content rejected by the store ({type(e).__name__}); left out")
        out.append(Finished(row, p.begun, p.settlement, None))
        return [_Item(item.kind, f, item.done, item.loop, item.attempts) for f in out]
    return []


def _bare(row: AuditRow, e: Exception) -> AuditRow:
    out = dataclasses.replace(row)
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if not isinstance(value, str):
            continue
        if f.name in ESSENTIAL:
            setattr(out, f.name,
                    value.encode("ascii", "replace").decode().replace("\x00", "")[:16 if f.name == "method" else 200])
        else:
            setattr(out, f.name, None)
    out.error = f"audit fields rejected by the store ({type(e).__name__}); they were left out"
    return out


class AuditUnavailable(RuntimeError):
    """The audit row could not be committed; the request must not go upstream."""
