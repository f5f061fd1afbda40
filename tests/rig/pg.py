"""A throwaway PostgreSQL database, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

PG_ADMIN_URL = os.environ.get("SPENDGATE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def throwaway_database(prefix: str = "spendgate_test", admin_url: str = PG_ADMIN_URL) -> Iterator[str | None]:
    """Yields a new database's SQLAlchemy URL (dropped afterwards), or None when no server answers."""
    try:
        import psycopg

        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except Exception:  # noqa: BLE001 - psycopg missing or no server: the caller decides what that means
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{base}/{name}"
        finally:
            _drop(admin, name)


def _drop(admin: Any, name: str) -> None:
    """Drop the database even while a client of it still runs (a gateway a test stops after its
    database fixture ends): WITH (FORCE) ends its sessions and drops in one step (PostgreSQL >= 13);
    older servers get their sessions ended first, again if a client connected back meanwhile."""
    import psycopg

    try:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    except psycopg.errors.SyntaxError:
        pass
    for attempt in range(5):
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            return
        except psycopg.errors.ObjectInUse:
            if attempt == 4:
                raise
            time.sleep(0.2)
