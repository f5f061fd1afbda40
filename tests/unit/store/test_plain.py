"""The hot path's plain-driver statements (`store.plain`)."""

from __future__ import annotations

import sqlite3
from typing import Any

from spendgate.store.plain import Prepared, Transaction

_INSERT = Prepared("INSERT INTO t (a) VALUES (:a)")


class _Recording:
    """The real sqlite3 cursor, with the names of the methods called on it written down."""

    def __init__(self, cursor: Any) -> None:
        self._cursor, self.calls = cursor, []

    def __getattr__(self, name: str) -> Any:
        if name in ("execute", "executemany"):
            self.calls.append(name)
        return getattr(self._cursor, name)


def test_a_list_of_one_parameter_set_runs_as_one_execute_and_longer_lists_as_executemany() -> None:
    # psycopg's executemany runs a pipeline: for one row, two more round trips than execute.
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a INTEGER)")
    tx = Transaction(conn, sqlite=True)
    rec = _Recording(tx._cursor)
    tx._cursor = rec
    assert tx.execute(_INSERT, [{"a": 1}]).rowcount == 1
    assert tx.execute(_INSERT, [{"a": 2}, {"a": 3}]).rowcount == 2
    assert tx.execute(_INSERT, {"a": 4}).rowcount == 1
    assert rec.calls == ["execute", "executemany", "execute"]
    assert [r[0] for r in conn.execute("SELECT a FROM t ORDER BY a")] == [1, 2, 3, 4]
