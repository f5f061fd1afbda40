"""Fixtures for unit tests that need a real database: a migrated SQLite file per test, and the same
on PostgreSQL when a server answers (one database per module, emptied before each test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spendgate.store import Database
from tests.unit.databases import empty_pg, sqlite_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database: SQLite, and PostgreSQL (skipped when no server answers)."""
    if request.param == "sqlite":
        d = sqlite_database(tmp_path / "spendgate.db")
    else:
        d = Database(request.getfixturevalue("pg_module_url"))
        empty_pg(d)
    yield d
    d.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """For checks where the database engine does not matter."""
    d = sqlite_database(tmp_path / "spendgate.db")
    yield d
    d.close()
