"""SQLite: the write-ahead log the event loop appends to, copied into the database file by the
audit writer's thread (`writer`), never on the loop (a checkpoint ends with an fsync).

A pass copies the frames there were when it began; the WAL restarts (instead of growing without
end: 1.3 GB after 50,000 requests) only after a pass that leaves none, which under steady load is
rare. So a WAL past WAL_RESTART is restarted here, writers waiting a few ms (their batches come to
the thread), and a file a burst left past WAL_LIMIT is truncated.

A pass copies each page that changed once, however often it changed: the same few pages (the
tails of the audit table and its indexes, the reservations, the spend row) change in every
commit, so passes `Due` every 2 s or every 500 commits, not every 0.25 s, copy (and fsync) them
far less often: per request at c=1, 1.75 -> 0.7 reads from the WAL and no fsync (bench/syscalls.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from spendgate.store.plain import Link, Prepared

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 0.25  # how often an idle writer thread asks whether a pass is `Due`
CHECKPOINT_EVERY, CHECKPOINT_COMMITS = 2.0, 500  # a pass is due after this long or this many commits
CHECKPOINT_ROUNDS = 4  # passes in a row while the loop keeps appending
WAL_RESTART, WAL_LIMIT = 64 << 20, 256 << 20  # restart a WAL this full; truncate a WAL file this large
_FRAME_BYTES = 4096 + 24  # a WAL frame: a page (SQLite's default size, which the gateway keeps) and its header
_CHECKPOINT = Prepared("PRAGMA wal_checkpoint(PASSIVE)")
_RESTART, _TRUNCATE = Prepared("PRAGMA wal_checkpoint(RESTART)"), Prepared("PRAGMA wal_checkpoint(TRUNCATE)")


class Due:
    """Whether the writer thread's next pass is due, from the store's count of commits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at, self._commits = clock(), 0

    def __call__(self, commits: int) -> bool:
        now = self._clock()
        if now - self._at < CHECKPOINT_EVERY and commits - self._commits < CHECKPOINT_COMMITS:
            return False
        self._at, self._commits = now, commits
        return True


def checkpoint(link: Link, database: Path | None) -> None:
    """Copy the WAL of the database file `database` into it, on the thread's `link`; never raises."""
    try:
        with link.transaction() as conn:
            for _ in range(CHECKPOINT_ROUNDS):
                busy, frames, copied = conn.execute(_CHECKPOINT).one()
                if busy or copied >= frames:
                    break
            if _wal_bytes(database) > WAL_LIMIT:
                conn.execute(_TRUNCATE)
            elif frames * _FRAME_BYTES > WAL_RESTART:
                conn.execute(_RESTART)
    except Exception as e:
        log.debug("audit: WAL checkpoint failed (%s)", type(e).__name__)


def _wal_bytes(database: Path | None) -> int:
    wal = database.with_name(database.name + "-wal") if database is not None else None
    return wal.stat().st_size if wal is not None and wal.exists() else 0
