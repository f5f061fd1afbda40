"""PostgreSQL: a whole audit-writer batch as one call of `spendgate_write_batch` (migration 0007, leaner since 0009).

Statement by statement, a capped request's batch made seven round trips to the server, each
~50 µs of the gateway's CPU and ~150 µs of the waiting request's time; the function makes one.
The gateway still decides everything that is not data: which budget rows, in which (lock) order,
which reservation waits on which rate count, the periods and the messages. The function only
runs those statements where the rows are, and says what each returned (`call`).
SQLite runs the same statements in the gateway (`audit.write`, `ratelimits.take`, `budgets.apply`):
there a statement costs no round trip.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any, Sequence

from spendgate.periods import period_end, period_start
from spendgate.store import ratelimits
from spendgate.store.audit import COLUMNS, COMPLETE_COLUMNS, AuditRow, ContentRow
from spendgate.store.budgets import Blocked, BudgetDef, BudgetRef, ReserveRequest, ReserveResult, Settlement
from spendgate.store.plain import Prepared, Transaction, utc_text
from spendgate.store.ratelimits import RateCheck, RateResult

Row = tuple[int, datetime]  # (budget, period start)
CALL = Prepared("SELECT spendgate_write_batch(CAST(:batch AS jsonb)) AS out")


class Call:
    """One batch as the function's argument (`json`), and the reading of its answer (`results`).
    `rates` in key order (the rows' lock order); each reservation names the rate count it waits on
    (an index into `rates`) or None."""

    def __init__(self, *, inserts: Sequence[AuditRow] = (), completions: Sequence[AuditRow] = (),
                 contents: Sequence[ContentRow] = (), rates: Sequence[RateCheck] = (),
                 settles: Sequence[Settlement] = (), reserves: Sequence[tuple[ReserveRequest, int | None]] = ()):
        batch: dict[str, Any] = {}
        if inserts:
            batch["inserts"] = [_row(r, COLUMNS) for r in inserts]
        if completions:
            batch["completions"] = [_row(r, COMPLETE_COLUMNS) for r in completions]
        if contents:
            batch["contents"] = [{**dataclasses.asdict(c), "captured_at": utc_text(c.captured_at)} for c in contents]
        if rates:
            batch["rates"] = [_rate(c) for c in rates]
        self._rows, self._budget_of = _plan(batch, settles, [rq for rq, _ in reserves])
        if reserves:
            batch["reserves"] = [{"rid": rq.request_id, "amt": rq.amount_nusd, "exp": utc_text(rq.now + rq.ttl),
                                  "rate": rate} for rq, rate in reserves]
        self._rates, self._reserves = rates, reserves
        self.json = json.dumps(batch, separators=(",", ":"))

    def results(self, out: dict[str, Any]) -> tuple[list[RateResult], list[ReserveResult | None]]:
        """Each rate count's result and each reservation's (None for one its rate count refused)."""
        rows, budget_of = self._rows, self._budget_of
        rate_results = [RateResult(True) if r[0] else ratelimits.refused(c, int(r[1]), int(r[2]))
                        for c, r in zip(self._rates, out["rates"])]
        results: list[ReserveResult | None] = []
        for i, ((rq, _), (gated, blocked, held, left)) in enumerate(zip(self._reserves, out["reserves"])):
            if not gated:
                results.append(None)
            elif blocked is not None:
                k, spent, reserved, cap = blocked
                b = budget_of[(i, rows[k][0])]
                results.append(ReserveResult((), None, Blocked(b.scope, b.name, b.period, int(spent), int(reserved),
                                                               int(cap), period_end(b.period, rq.now))))
            else:
                refs = tuple(BudgetRef(*rows[k]) for k in held)
                results.append(ReserveResult(refs, None if left is None else int(left)))
        return rate_results, results


def call(conn: Transaction, **batch: Any) -> tuple[list[RateResult], list[ReserveResult | None]]:
    """One batch in one statement on `conn` (`Call` says what `batch` holds)."""
    c = Call(**batch)
    return c.results(conn.execute(CALL, {"batch": c.json}).one().out)


def _plan(batch: dict[str, Any], settles: Sequence[Settlement], reserves: Sequence[ReserveRequest]
          ) -> tuple[list[Row], dict[tuple[int, int], BudgetDef]]:
    """The budget rows the batch settles and holds on, in (budget, period) order (`budgets.apply`'s)."""
    settled: dict[Row, tuple[list[str], list[int]]] = {}  # row -> (its requests, actual costs)
    for st in settles:
        for ref in st.refs:
            rids, actual = settled.setdefault((ref.budget_id, ref.period_start), ([], []))
            rids.append(st.request_id)
            actual.append(st.actual_nusd)
    wants: dict[Row, list[dict[str, int]]] = {}
    budget_of: dict[tuple[int, int], BudgetDef] = {}
    for i, rq in enumerate(reserves):
        for b in rq.budgets:
            wants.setdefault((b.id, period_start(b.period, rq.now)), []).append({"i": i, "amt": rq.amount_nusd})
            budget_of[(i, b.id)] = b
    rows = sorted(set(settled) | set(wants))
    ops = []
    for row in rows:
        o: dict[str, Any] = {"b": row[0], "ps": utc_text(row[1])}
        if row in settled:
            o["rids"], o["actual"] = settled[row][0], sum(settled[row][1])
        if row in wants:
            o["wants"] = wants[row]
        ops.append(o)
    if ops:
        batch["ops"] = ops
    if settles:
        batch["settle_rids"] = [st.request_id for st in settles]
    return rows, budget_of


def _row(row: AuditRow, columns: tuple[str, ...]) -> dict[str, Any]:
    out = row.params(columns)
    for name in ("started_at", "ended_at"):
        if name in out:
            out[name] = utc_text(out[name])
    return out


def _rate(check: RateCheck) -> dict[str, Any]:
    window, _, weight = ratelimits.window(check)
    return {"k": check.key_id, "w": window, "weight": weight, "rpm": check.rpm}
