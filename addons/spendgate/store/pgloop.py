"""PostgreSQL: the audit writer's batches awaited on the event loop, through one async connection.

Through the writer thread, a request's begin crossed threads twice and the GIL several times:
~10 context switches per request at c=1 and 3.6 at c=16 (bare mitmdump: 2.1 and 0.01). On the
loop the one `spendgate_write_batch` call is sent, the loop serves other flows until the answer
comes, and the waiting requests resume there: 3.5 and 0.3, and ~11-16 % less gateway CPU per
request at c=16. One batch is in flight at a time; the next gathers meanwhile (group commit).
A batch that fails here goes to the writer thread, which retries, isolates and salvages it; one
that could not even connect (`Unreachable`) fails its waiting requests at once, as the thread would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from spendgate.store import PG_CONNECT_ARGS, Database, batches, pgbatch
from spendgate.store.batches import Item

_CALL = pgbatch.CALL.text_for(False)


class Unreachable(ConnectionError):
    """The loop could not connect: the batch was not written."""


class LoopConnection:
    """The event loop's connection: made on first use, and again on another loop (tests run many),
    for a store whose engine was replaced, or after a failure (`close`)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: Any = None  # psycopg.AsyncConnection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None

    async def write(self, batch: list[Item]) -> None:
        """Commit the batch (one statement in autocommit) and set each item's result; raises as psycopg does."""
        call, settle = batches.pg_call(batch)
        try:
            conn = await self._connection()
        except Exception as e:  # nothing was sent: not worth a second connect timeout in the thread
            raise Unreachable(type(e).__name__) from e
        try:
            cur = await conn.execute(_CALL, {"batch": call.json})
            row = await cur.fetchone()
        except BaseException:  # failed, or cancelled mid-statement: the connection's state is unknown
            self.close()
            raise
        settle(row[0])

    async def _connection(self) -> Any:
        loop, engine = asyncio.get_running_loop(), self._db.engine
        if self._conn is None or self._conn.closed or self._loop is not loop or self._engine is not engine:
            self.close()
            import psycopg  # only PostgreSQL stores need psycopg

            conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **PG_CONNECT_ARGS)
            self._loop, self._engine = loop, engine
        return self._conn

    def close(self) -> None:
        """Drop the connection; from any thread (closing a psycopg connection only closes its socket)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.pgconn.finish()
            except Exception:
                pass
