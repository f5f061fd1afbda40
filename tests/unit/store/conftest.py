"""The store tests' SQLite database and a running audit writer on it (test_writer, test_writer_loop)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spendgate.store import Database
from spendgate.store.writer import AuditWriter
from tests.unit.databases import sqlite_database


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    d = sqlite_database(path)
    yield d
    d.close()


@pytest.fixture
def writer(db: Database) -> Iterator[AuditWriter]:
    w = AuditWriter(db)
    w.start()
    yield w
    w.stop()
