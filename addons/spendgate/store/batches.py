"""One audit-writer batch: the items requests hand the writer and the transaction that writes them.

`write_batch` is what a batch commits, wherever it commits (the event loop or the writer thread,
see `writer`); `salvage` is the barer version of an item the store rejects, so a bad row is saved
without its free text instead of costing the other rows of its batch theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

from spendgate.store import audit, budgets, pgbatch, ratelimits
from spendgate.store.audit import ESSENTIAL, AuditRow, ContentRow
from spendgate.store.budgets import ReserveRequest, ReserveResult, Settlement
from spendgate.store.plain import Link, Prepared, Transaction
from spendgate.store.ratelimits import RateCheck, RateResult


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
class Item:
    kind: Literal["begin", "finish", "reserve"]
    payload: Payload
    done: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    attempts: int = 0
    result: Any = None
    doubtful: bool = False  # a write of it raised: it may have committed all the same (its answer lost)

    @property
    def request_id(self) -> str:
        p = self.payload
        return p.row.id if isinstance(p, (Begin, Finished)) else p.request_id


class AuditUnavailable(RuntimeError):
    """The audit row could not be committed; the request must not go upstream."""


def resolve(items: list[Item], exc: BaseException | None) -> None:
    """Wake each waiting request, from any thread: one hand-over per event loop per batch, not one per row."""
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


def write_batch(link: Link, batch: list[Item]) -> None:
    """One batch's transaction: rows inserted and completed, rate counts, reservations and settlements;
    each item's `result` set once it is committed."""
    if any(item.doubtful for item in batch):
        _drop_landed(link, batch)
    if not link.sqlite:  # one statement in autocommit: one round trip (`pgbatch`), the same order of locks
        call, settle = pg_call(batch)
        with link.statement() as conn:
            out = conn.execute(pgbatch.CALL, {"batch": call.json}).one().out
        settle(out)
        return
    inserts, completions, contents, settles, reserving, begins = _sort(batch)
    with link.transaction() as conn:
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


_ALLOWED = RateResult(True)
_LANDED = Prepared("SELECT id FROM audit_log WHERE id = :id AND ended_at IS NOT NULL")


def _drop_landed(link: Link, batch: list[Item]) -> None:
    """A batch written again after a failure may have committed the first time (the connection went
    away with its answer). A completion already in the store is written again as it is, but its cost
    must not be added to its budgets twice, nor its content inserted twice."""
    settling = [(item, p) for item in batch if item.doubtful
                and isinstance(p := item.payload, Finished) and p.begun and (p.settlement or p.content)]
    if not settling:  # a retried begin, say: nothing to look up
        return
    with link.statement() as conn:
        for item, p in settling:
            if conn.execute(_LANDED, {"id": p.row.id}).first() is not None:
                item.payload = dataclasses.replace(p, settlement=None, content=None)


def _sort(batch: list[Item]) -> tuple[list[AuditRow], list[AuditRow], list[ContentRow], list[Settlement],
                                      list[tuple[Item, ReserveRequest]], list[Item]]:
    """The batch's rows to insert and complete, contents, settlements, reservations and begins."""
    inserts: list[AuditRow] = []
    completions: list[AuditRow] = []
    contents: list[ContentRow] = []
    settles: list[Settlement] = []
    reserving: list[tuple[Item, ReserveRequest]] = []
    begins: list[Item] = []
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
    return inserts, completions, contents, settles, reserving, begins


def settle_and_reserve(conn: Transaction, settles: Sequence[Settlement], reserves: Sequence[ReserveRequest]
                       ) -> list[ReserveResult]:
    """`budgets.apply` in this store's way: on PostgreSQL one round trip (`pgbatch`)."""
    if conn.sqlite:
        return budgets.apply(conn, settles, reserves)
    found = pgbatch.call(conn, settles=settles, reserves=[(rq, None) for rq in reserves])[1]
    return [r for r in found if r is not None]


def take_rate(conn: Transaction, check: RateCheck) -> RateResult:
    """`ratelimits.take` in this store's way: on PostgreSQL one round trip (`pgbatch`)."""
    return ratelimits.take(conn, check) if conn.sqlite else pgbatch.call(conn, rates=[check])[0][0]


def pg_call(batch: list[Item]) -> tuple[pgbatch.Call, Callable[[Any], None]]:
    """The batch as `spendgate_write_batch`'s argument, and what sets each item's result from its answer
    (the writer thread's `write_batch` and the event loop's `pgloop` call it alike)."""
    inserts, completions, contents, settles, reserving, begins = _sort(batch)
    rates: list[RateCheck] = []
    rate_of: dict[int, int] = {}
    reserves: list[tuple[ReserveRequest, int | None]] = [(rq, None) for _, rq in reserving]
    owners = [item for item, _ in reserving]
    for item in sorted(begins, key=_rate_order):
        p = item.payload
        assert isinstance(p, Begin)
        if p.rate is not None:
            rate_of[id(item)] = len(rates)
            rates.append(p.rate)
        if p.reserve is not None:
            reserves.append((p.reserve, rate_of.get(id(item))))
            owners.append(item)
    call = pgbatch.Call(inserts=inserts, completions=completions, contents=contents, rates=rates, settles=settles,
                        reserves=reserves)

    def settle(out: Any) -> None:
        rate_results, results = call.results(out)
        reserved = {id(item): result for item, result in zip(owners, results) if result is not None}
        for item in batch:
            if item.kind == "reserve":
                item.result = reserved[id(item)]
            elif item.kind == "begin":
                at = rate_of.get(id(item))
                item.result = Begun(None if at is None else rate_results[at], reserved.get(id(item)))

    return call, settle


def _rate_order(item: Item) -> str:
    p = item.payload
    return p.rate.key_id if isinstance(p, Begin) and p.rate is not None else ""


def salvage(item: Item, e: Exception) -> list[Item]:
    """The item without the free text the store rejects, saying so in `error`, barest last; none for a
    reservation. A finished request's content goes before its completion and settlement do: the
    content row may be what the store rejects (a conflict), and the other two must still land."""
    p = item.payload
    if isinstance(p, Begin):
        return [Item(item.kind, Begin(_bare(p.row, e), p.rate, p.reserve), item.done, item.loop, item.attempts,
                     doubtful=item.doubtful)]
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
        return [Item(item.kind, f, item.done, item.loop, item.attempts, doubtful=item.doubtful) for f in out]
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
