"""The store: the only code that talks SQL. One `Database` (engine, schema) and one module per
concern over it: `keys` (users, teams, keys, caps, admin events), `audit` (the audit log),
`budgets` (spend and reservations), `alerts` (alert marks), `reports` (reads for people and
alerts), plus the group-commit `writer`, the in-memory `registry` and `maintenance`.

Everything here blocks; the proxy calls it from threads, never on the event loop.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from spendgate.store.models import UTCDateTime
from spendgate.store.plain import Link, Transaction

MIGRATIONS = Path(__file__).parent / "migrations"


class StoreError(RuntimeError):
    pass


class NotFound(StoreError):
    pass


class SchemaError(StoreError):
    """The database's schema is not the one this Spendgate needs; the message names the fix."""


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory ones)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path).expanduser() if path and path != ":memory:" else None


# Bounded waits: a database that stops answering must surface as errors (503, alerts), not hangs.
# Every PostgreSQL connection gets them: the engine's, and the event loop's (`pgloop`).
PG_CONNECT_ARGS: dict[str, Any] = {"connect_timeout": 5, "options": "-c statement_timeout=30000"}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=1800,
                            pool_timeout=10, connect_args=dict(PG_CONNECT_ARGS))


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")

    def close(self) -> None:
        self.engine.dispose()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            return str(rev) if rev is not None else None

    @staticmethod
    def head_revision() -> str | None:
        """The newest migration. Revisions are numbered files in one line, so no need to load Alembic."""
        found = sorted(p.name for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
        return found[-1][:4] if found else None

    def upgrade(self) -> tuple[str | None, str | None]:
        """Apply pending migrations; returns (before, after) revisions."""
        from alembic import command  # Alembic costs ~0.3 s to import; only `db upgrade` needs it
        from alembic.config import Config as AlembicConfig

        path = sqlite_path(self.url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)  # only creating the schema creates the file
        before = self.current_revision()
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, self.current_revision()

    def require_current(self, allow_empty: bool = False) -> None:
        """Refuse a schema that is behind (or ahead): never migrate silently under running gateways."""
        path = sqlite_path(self.url)
        if path is not None and not path.exists():  # do not leave an empty file behind either
            if allow_empty:
                return
            raise SchemaError(f"no Spendgate database at {path}: run `spendgate db upgrade` "
                              "(or start `spendgate serve`)")
        current, head = self.current_revision(), self.head_revision()
        if current == head or (current is None and allow_empty):
            return
        where = self.url.split("@")[-1] if "@" in self.url else self.url
        if current is None:
            raise SchemaError(f"no Spendgate database at {where}: "
                              "run `spendgate db upgrade` (or start `spendgate serve`)")
        raise SchemaError(f"database schema at {where} is at revision {current}, this Spendgate needs {head}: "
                          "run `spendgate db upgrade`")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction of the hot path's prepared statements (`store.plain`), committed at the end."""
        link = self.link()
        try:
            with link.transaction() as tx:
                yield tx
        finally:
            link.close()

    def link(self, pragmas: tuple[str, ...] = ()) -> Link:
        """A connection for one thread to keep (the audit writer's); SQLite `pragmas` set on it."""
        return Link(lambda: self.engine, self.is_sqlite, pragmas)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        """INSERT .. ON CONFLICT DO NOTHING in this database's dialect."""
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).values(values).on_conflict_do_nothing()
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(values).on_conflict_do_nothing()


def ts_param(name: str) -> Any:
    """A bind parameter for a UTC timestamp in SQL text run through SQLAlchemy."""
    return sa.bindparam(name, type_=UTCDateTime())
