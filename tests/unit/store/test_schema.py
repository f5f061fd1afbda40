"""The schema is declared once per layer and the layers agree: the SQLModel tables (`store.models`),
the Alembic migrations, `store.audit.AuditRow` (whose fields drive the audit SQL) and the CLI's
audit columns. Checked on a freshly migrated SQLite and PostgreSQL database with Alembic's own
comparison, the one `alembic revision --autogenerate` would make a migration from."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import spendgate.store.models  # noqa: F401 - registers the tables on SQLModel.metadata
from spendgate.cli.reports import AUDIT_COLUMNS
from spendgate.store import MIGRATIONS, Database, SchemaError
from spendgate.store.audit import COLUMNS, COMPLETION, ESSENTIAL, AuditRow
from spendgate.store.models import AuditRecord
from tests.rig.pg import throwaway_database


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A fresh database brought to the head revision by the migrations alone."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path_factory.mktemp('schema') / 'fresh.db'}")
        db.upgrade()
        yield db
        db.close()
        return
    with throwaway_database() as url:
        if url is None:
            pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
        db = Database(url)
        db.upgrade()
        yield db
        db.close()


def test_the_migrations_build_exactly_the_models(migrated: Database) -> None:
    # compare_type is on (Alembic's default): types and lengths count, not only names.
    with migrated.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], "\n".join(map(str, diff))


def test_the_migrations_reach_the_head_revision(migrated: Database) -> None:
    assert migrated.current_revision() == Database.head_revision() is not None
    migrated.require_current()


def test_the_audit_row_is_the_audit_log_table(migrated: Database) -> None:
    fields = tuple(f.name for f in dataclasses.fields(AuditRow))
    with migrated.engine.connect() as conn:
        migrated_columns = tuple(c["name"] for c in sa.inspect(conn).get_columns("audit_log"))
    assert fields == migrated_columns
    assert fields == tuple(c.name for c in AuditRecord.__table__.columns)  # type: ignore[attr-defined]
    assert COLUMNS == fields


def test_the_completion_and_essential_columns_are_audit_columns() -> None:
    assert set(COMPLETION) <= set(COLUMNS) and set(ESSENTIAL) <= set(COLUMNS)
    assert "id" not in COMPLETION and "started_at" not in COMPLETION  # set once, at begin


def test_the_cli_audit_columns_derive_from_the_row() -> None:
    # Every row field, in order, money shown as USD; the instance id is for operators only.
    shown = ["cost_nusd" if c == "cost_usd" else c for c in AUDIT_COLUMNS]
    assert shown == [c for c in COLUMNS if c != "instance_id"]


def test_a_schema_behind_or_missing_is_refused_with_the_fix(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with pytest.raises(SchemaError, match="spendgate db upgrade"):
            db.require_current()
        db.require_current(allow_empty=True)  # serve initialises an empty database itself
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")  # what an older Spendgate left
        with pytest.raises(SchemaError, match=r"revision 0004.*spendgate db upgrade"):
            db.require_current()
        assert db.upgrade() == ("0004", Database.head_revision())
        db.require_current()
    finally:
        db.close()


def test_a_refused_database_is_not_created_on_the_way(tmp_path: Path) -> None:
    """`spendgate keys list` in the wrong folder must not leave an empty database file behind."""
    path = tmp_path / "missing" / "spendgate.db"
    db = Database(f"sqlite:///{path}")
    try:
        with pytest.raises(SchemaError, match="no Spendgate database"):
            db.require_current()
        assert not path.exists() and not path.parent.exists()
    finally:
        db.close()


def _upgrade_to(db: Database, revision: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_reservations_in_flight_survive_the_upgrade_that_rebuilds_their_table(tmp_path: Path) -> None:
    # 0008 rebuilds SQLite's reservations table without its rowid: a gateway upgraded while requests
    # hold reservations must find them all after it.
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _upgrade_to(db, "0007")
        with db.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO budgets (id, scope, name, period, cap_nusd, created_at, updated_at) "
                                 "VALUES (1, 'user', 'u', 'day', 100, '2026-01-01', '2026-01-01')"))
            for rid in ("sgr_a", "sgr_b"):
                conn.execute(sa.text("INSERT INTO reservations VALUES (:r, 1, '2026-06-10 00:00:00.000000', 7, "
                                     "'2026-06-10 12:10:00.000000')"), {"r": rid})
        db.upgrade()
        with db.engine.connect() as conn:
            kept = conn.execute(sa.text("SELECT request_id, budget_id, amount_nusd FROM reservations "
                                        "ORDER BY request_id")).all()
            ddl = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = 'reservations'")).scalar()
        assert [tuple(r) for r in kept] == [("sgr_a", 1, 7), ("sgr_b", 1, 7)]
        assert "WITHOUT ROWID" in ddl
    finally:
        db.close()


@pytest.mark.parametrize("outcome", ["blocked_cap", "incomplete"])
def test_rows_by_an_outcome_other_than_completed_are_read_from_the_outcome_index(migrated: Database,
                                                                                 outcome: str) -> None:
    # The index holds only rows not `completed` (0008); SQLite uses it only if the query says so.
    from spendgate.store import audit

    t = AuditRecord.__table__  # type: ignore[attr-defined]
    q = sa.select(t.c.id).where(*audit._by_outcome(t, outcome)).order_by(t.c.started_at.desc()).limit(100)
    sql = str(q.compile(migrated.engine, compile_kwargs={"literal_binds": True}))
    with migrated.engine.connect() as conn:
        if migrated.is_sqlite:
            plan = " ".join(str(r[3]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")  # an empty table: ask which index it can use
            plan = " ".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + sql))
    assert "ix_audit_log_outcome" in plan, plan
