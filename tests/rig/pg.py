"""A throwaway PostgreSQL database, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

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
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
