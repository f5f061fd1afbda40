"""The hot path's SQL through the plain DB-API driver (sqlite3, psycopg), not SQLAlchemy's Core.

Every request to a model host costs one writer transaction (its audit row, its rate count, its
reservation; then its completion and settlement). Through SQLAlchemy each statement pays for
parameter processing, result wrapping and connection events: about twice what the statements
cost in the driver. These few statements are fixed text, so they are written once in
`:name` style and run as the driver takes them:

- `Prepared` holds a statement's text and which of its parameters are UTC timestamps, converted
  as `UTCDateTime` stores them (naive UTC; on SQLite the text SQLAlchemy writes and reads);
- `Transaction` runs them on one connection and returns rows as named tuples, so the code on top
  (`audit.write`, `budgets.apply`, `ratelimits.take`) reads the same on either database.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

_NAME = re.compile(r"(?<![:\w]):(\w+)")


class Prepared:
    """A statement in `:name` style; `times` names its timestamp parameters. `names` are its
    parameters in the order they appear, and `time_at` the timestamps' places among them, for
    `Transaction.execute_values`."""

    __slots__ = ("sql", "times", "names", "time_at", "_pyformat", "_qmark", "_format")

    def __init__(self, sql: str, times: Iterable[str] = ()) -> None:
        self.sql = sql
        self.times = tuple(times)
        self.names = tuple(_NAME.findall(sql))
        escaped = sql.replace("%", "%%")
        self._pyformat = _NAME.sub(r"%(\1)s", escaped)  # psycopg's style
        self._qmark, self._format = _NAME.sub("?", sql), _NAME.sub("%s", escaped)  # the same, positional
        self.time_at = tuple(i for i, name in enumerate(self.names) if name in self.times)

    def text_for(self, sqlite: bool) -> str:
        return self.sql if sqlite else self._pyformat

    def positional_for(self, sqlite: bool) -> str:
        return self._qmark if sqlite else self._format

    def __repr__(self) -> str:
        return f"Prepared({self.sql[:60]!r})"


def utc_text(value: datetime | None) -> str | None:
    """As SQLAlchemy's SQLite DateTime stores it (always with microseconds), so both read it alike;
    PostgreSQL reads it as a timestamp too (`pgbatch` sends times in JSON so)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")  # 4x faster than the same strftime


def _pg_time(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


class Result:
    """What a statement left: `rowcount`, and its rows (RETURNING, SELECT) as named tuples."""

    __slots__ = ("_cursor", "rowcount")

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.rowcount: int = cursor.rowcount

    def first(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description else None

    def one(self) -> Any:
        row = self.first()
        if row is None:
            raise LookupError("expected one row, got none")
        return row

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor.fetchall() if self._cursor.description else ())


_ROW_TYPES: dict[tuple[str, ...], Any] = {}


def _named_row(cursor: Any, row: tuple[Any, ...]) -> Any:
    """sqlite3's row factory: a named tuple per column list, made once."""
    names = tuple(d[0] for d in cursor.description)
    kind = _ROW_TYPES.get(names)
    if kind is None:
        kind = _ROW_TYPES[names] = namedtuple("Row", names)
    return kind(*row)


class Transaction:
    """Statements on one DB-API connection, inside the transaction its driver opens implicitly;
    the owner commits or rolls back (`Database.transaction`, the audit writer)."""

    def __init__(self, driver_connection: Any, sqlite: bool) -> None:
        self.sqlite = sqlite
        if sqlite:
            self._cursor = driver_connection.cursor()
            self._cursor.row_factory = _named_row
            self._time = utc_text
        else:
            from psycopg.rows import namedtuple_row  # only PostgreSQL stores need psycopg

            self._cursor = driver_connection.cursor(row_factory=namedtuple_row)
            self._time = _pg_time  # type: ignore[assignment]

    def _params(self, stmt: Prepared, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if not stmt.times:
            return params
        out = dict(params)
        for name in stmt.times:
            if name in out:
                out[name] = self._time(out[name])
        return out

    def execute(self, stmt: Prepared, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None) -> Result:
        """One statement; a list of parameter sets runs it once per set (`executemany`). A list of one
        runs as one `execute`: psycopg's executemany is a pipeline, two more round trips on PostgreSQL."""
        sql = stmt.text_for(self.sqlite)
        if isinstance(params, Sequence) and len(params) == 1:
            params = params[0]
        if isinstance(params, Sequence):
            self._cursor.executemany(sql, [self._params(stmt, p) for p in params])
        else:
            self._cursor.execute(sql, self._params(stmt, params or {}))
        return Result(self._cursor)

    def execute_values(self, stmt: Prepared, rows: Sequence[Sequence[Any]]) -> None:
        """`execute` with each parameter set given as values in `stmt.names` order: no dict per row,
        and the driver binds by position instead of looking each name up (~6 µs less for an audit row's
        40 columns on SQLite)."""
        sql = stmt.positional_for(self.sqlite)
        if stmt.time_at:
            rows = [self._timed(stmt, r) for r in rows]
        if len(rows) == 1:
            self._cursor.execute(sql, rows[0])
        else:
            self._cursor.executemany(sql, rows)

    def _timed(self, stmt: Prepared, values: Sequence[Any]) -> list[Any]:
        out = list(values)
        for i in stmt.time_at:
            out[i] = self._time(out[i])
        return out


class Link:
    """One connection its owner thread keeps (the audit writer): no pool checkout per batch, and
    on PostgreSQL no pre-ping round trip. After a failure it is rolled back, or replaced when even
    that fails (the server went away); so is a connection of an engine the store has replaced."""

    def __init__(self, engine_of: Callable[[], Any], sqlite: bool, pragmas: Sequence[str] = ()) -> None:
        self._engine_of = engine_of  # the store's current engine: its connect events (pragmas) run
        self._sqlite = sqlite
        self._pragmas = pragmas
        self._engine: Any = None
        self._raw: Any = None
        self._tx: Transaction | None = None
        self._autocommit = False  # PostgreSQL: the connection is in autocommit (`statement`)

    @property
    def sqlite(self) -> bool:
        return self._sqlite

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        tx = self._connect(autocommit=False)
        try:
            yield tx
            self._raw.commit()
        except BaseException:
            self._recover()
            raise

    @contextmanager
    def statement(self) -> Iterator[Transaction]:
        """For one statement that is its own transaction: on PostgreSQL in autocommit, so no BEGIN
        and no COMMIT round trip (`pgbatch`); elsewhere as `transaction`."""
        if self._sqlite:
            with self.transaction() as tx:
                yield tx
            return
        tx = self._connect(autocommit=True)
        try:
            yield tx
        except BaseException:
            self._recover()
            raise

    def _connect(self, autocommit: bool) -> Transaction:
        engine = self._engine_of()
        if self._raw is None or self._tx is None or engine is not self._engine:
            self.close()
            self._raw = engine.raw_connection()
            for pragma in self._pragmas:
                self._raw.driver_connection.execute(pragma)
            self._engine, self._tx = engine, Transaction(self._raw.driver_connection, self._sqlite)
        if not self._sqlite and self._autocommit != autocommit:
            try:
                self._raw.driver_connection.autocommit = self._autocommit = autocommit
            except Exception:
                self.close(invalidate=True)
                raise
        return self._tx

    def _recover(self) -> None:
        try:
            self._raw.rollback()
        except Exception:
            self.close(invalidate=True)

    def close(self, invalidate: bool = False) -> None:
        raw, self._raw, self._tx = self._raw, None, None
        autocommit, self._autocommit = self._autocommit, False
        if raw is None:
            return
        try:
            if invalidate:
                raw.invalidate()
            else:
                if autocommit:
                    raw.driver_connection.autocommit = False  # as the pool's other users expect it
                raw.close()
        except Exception:
            pass
