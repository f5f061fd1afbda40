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
