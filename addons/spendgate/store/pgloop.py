"""PostgreSQL: the audit writer's batches awaited on the event loop, through one async connection.

Through the writer thread, a request's begin crossed threads twice and the GIL several times:
~10 context switches per request at c=1 and 3.6 at c=16 (bare mitmdump: 2.1 and 0.01). On the
loop the one `spendgate_write_batch` call is sent, the loop serves other flows until the answer
comes, and the waiting requests resume there: 3.5 and 0.3, and ~11-16 % less gateway CPU per
request at c=16. One batch is in flight at a time; the next gathers meanwhile (group commit).
A batch that fails here goes to the writer thread, which retries, isolates and salvages it; one
that could not even connect (`Unreachable`) fails its waiting requests at once, as the thread would.

The call goes through libpq directly (`psycopg.pq`: a prepared statement sent, the socket watched
only until its answer is read): a c=1 batch, built and answered, cost the gateway 225 µs of CPU
through psycopg's async cursor and 159 µs this way (`bench/pg_call.py`, 3 alternating rounds).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from spendgate.store import PG_CONNECT_ARGS, Database, batches
from spendgate.store.batches import Item

_STATEMENT = b"spendgate_write_batch"  # prepared once per connection
_CALL = b"SELECT spendgate_write_batch($1::jsonb)"


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
        self._prepared = False

    async def write(self, batch: list[Item]) -> None:
        """Commit the batch (one statement in autocommit) and set each item's result; raises as psycopg does."""
        call, settle = batches.pg_call(batch)
        try:
            conn = await self._connection()
        except Exception as e:  # nothing was sent: not worth a second connect timeout in the thread
            raise Unreachable(type(e).__name__) from e
        try:
            pg = conn.pgconn
            if not self._prepared:
                pg.send_prepare(_STATEMENT, _CALL)
                await _answer(pg)
                self._prepared = True
            pg.send_query_prepared(_STATEMENT, [call.json.encode()])
            out = await _answer(pg)
        except BaseException:  # failed, or cancelled mid-statement: the connection's state is unknown
            self.close()
            raise
        settle(json.loads(out.get_value(0, 0)))

    async def _connection(self) -> Any:
        loop, engine = asyncio.get_running_loop(), self._db.engine
        if self._conn is None or self._conn.closed or self._loop is not loop or self._engine is not engine:
            self.close()
            import psycopg  # only PostgreSQL stores need psycopg

            conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **PG_CONNECT_ARGS)
            self._loop, self._engine, self._prepared = loop, engine, False
        return self._conn

    def close(self) -> None:
        """Drop the connection; from any thread (closing a psycopg connection only closes its socket)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.pgconn.finish()
            except Exception:
                pass


async def _answer(pg: Any) -> Any:
    """Send what libpq holds for `pg` (a psycopg.pq.PGconn, non-blocking) and read the statement's
    result; raises psycopg's error for a failed statement or a broken connection."""
    import psycopg
    from psycopg import pq

    loop, fd = asyncio.get_running_loop(), pg.socket
    while pg.flush():  # a large batch may not fit the socket's buffer at once
        sent = loop.create_future()
        loop.add_writer(fd, sent.set_result, None)
        try:
            await sent
        finally:
            loop.remove_writer(fd)
    done = loop.create_future()
    results: list[Any] = []

    def readable() -> None:
        if done.done():  # answered; the task has not resumed yet
            return
        try:
            pg.consume_input()
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    done.set_result(None)
                    return
                results.append(res)
        except BaseException as e:
            done.set_exception(e)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    res = results[-1]
    if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        raise psycopg.errors.error_from_result(res)
    return res
