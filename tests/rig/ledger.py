"""A gateway's database, read and written directly by end-to-end tests: fast where the CLI costs a
second a call.

* Keys and caps go through the same store calls as ``spendgate keys create`` / ``budgets set``
  (``KeyStore.create_key`` sets a key and its cap in one transaction), so a running gateway sees
  them exactly as it sees the CLI's.
* Audit rows are read with plain SQL (``SELECT *``), so any column the gateway adds shows up, and
  are shaped as ``spendgate audit --format json`` lists them: ``cost_usd`` (a ``Decimal`` USD, or
  ``None`` when the cost is unknown) next to the raw ``cost_nusd``.

    ledger = Ledger(gw)
    key = ledger.key("ann", cap="0.05")["key"]
    ...
    rows = ledger.settled("ann", 3)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from spendgate.money import parse_usd
from spendgate.store import Database
from spendgate.store.budgets import BudgetLedger
from spendgate.store.keys import KeyStore

NANO = Decimal(10**9)

Row = dict[str, Any]


def usd(nano: int | None) -> Decimal:
    """Nano-USD as exact USD (None counts as 0)."""
    return Decimal(nano or 0) / NANO


def nusd(usd_text: str | Decimal) -> int:
    """USD text as nano-USD, exactly."""
    return int(parse_usd(str(usd_text)))


class Ledger:
    """Keys, caps and audit rows of one gateway's database (any gateway sharing it sees the same)."""

    def __init__(self, db_url: str) -> None:
        self.db = Database(db_url)
        self.keys = KeyStore(self.db)
        self.budgets = BudgetLedger(self.db)

    @classmethod
    def of(cls, gw: Any) -> Ledger:
        return cls(gw.db_url)

    def close(self) -> None:
        self.db.close()

    # ---- admin

    def key(self, user: str, *, cap: str | None = None, period: str = "day", team: str | None = None,
            models: Sequence[str] = (), rpm: int | None = None) -> dict[str, Any]:
        """Mint a key (with its user's cap, in the same transaction, like ``keys create --cap``).

        Returns ``{"key", "key_id", "user", "team"}`` like ``keys create --format json``."""
        key_id, key = self.keys.create_key(user, team=team, models=tuple(models), rpm=rpm, actor="e2e",
                                           cap=(nusd(cap), period) if cap is not None else None)
        return {"key": key, "key_id": key_id, "user": user, "team": team}

    def set_cap(self, scope: str, name: str, cap: str, period: str = "day") -> None:
        """Like ``budgets set``: a running gateway sees it at its next registry poll (~0.25 s)."""
        self.keys.set_budget(scope, name, nusd(cap), period, actor="e2e")

    def revoke(self, key_id_or_user: str) -> None:
        self.keys.revoke(key_id_or_user, actor="e2e")

    # ---- caps

    def held(self, scope: str, name: str) -> tuple[int, int]:
        """(spent, reserved) of a cap in its current period, in nano-USD; (0, 0) when there is no cap."""
        for b in self.budgets.budget_status():
            if (b["scope"], b["name"]) == (scope, name):
                return int(b["spent_nusd"]), int(b["reserved_nusd"])
        return 0, 0

    def has_cap(self, scope: str, name: str) -> bool:
        return any((b["scope"], b["name"]) == (scope, name) for b in self.budgets.budget_status())

    # ---- audit

    def rows(self, user: str) -> list[Row]:
        """The user's audit rows, oldest first, as ``spendgate audit --format json`` shows them
        (plus ``cost_nusd``)."""
        q = sa.text('SELECT * FROM audit_log WHERE "user" = :u ORDER BY started_at, id')
        with self.db.engine.connect() as conn:
            out = []
            for r in conn.execute(q, {"u": user}):
                d = dict(r._mapping)
                d["cost_usd"] = None if d.get("cost_nusd") is None else usd(d["cost_nusd"])
                out.append(d)
            return out

    def settled(self, user: str, n: int | None = None, *, where: Callable[[list[Row]], bool] | None = None,
                timeout: float = 10.0) -> list[Row]:
        """The user's rows once there are ``n`` of them (or ``where(rows)`` holds), none is still
        ``incomplete``, and the user's own cap (if any) holds no reservation."""
        deadline = time.monotonic() + timeout
        capped = self.has_cap("user", user)
        while True:
            rows = self.rows(user)
            enough = (n is None or len(rows) == n) and (where is None or where(rows))
            if enough and all(r["outcome"] != "incomplete" for r in rows) and (
                    not capped or self.held("user", user)[1] == 0):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{user}: {len(rows)} audit rows (wanted {n}), outcomes {Counter(r['outcome'] for r in rows)}, "
                    f"held {self.held('user', user)}: "
                    + "; ".join(f"{r['endpoint_kind']} {r['model_requested']} {r['outcome']} {r['status_code']}"
                                for r in rows))
            time.sleep(0.05)

    def spent(self, user: str) -> Decimal:
        """The user's spend: the sum of their audit rows' cost_usd."""
        return sum((r["cost_usd"] or Decimal(0) for r in self.rows(user)), Decimal(0))
