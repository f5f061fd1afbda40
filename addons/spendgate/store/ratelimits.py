"""`--rpm` across instances: a sliding-window counter per key, in the store every instance shares.

The count is taken inside the transaction that commits the request's begun audit row, so a
rate-limited key costs no extra round trip. Two fixed one-minute windows approximate the
sliding one (the previous minute's count, weighted by how much of it still overlaps the last
60 s, plus this minute's); the conditional UPDATE locks the key's row, so concurrent instances
serialise on it and the limit holds in total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from spendgate.store.plain import Prepared, Transaction

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class RateCheck:
    key_id: str
    rpm: int
    now: datetime


@dataclass(frozen=True)
class RateResult:
    allowed: bool
    retry_after: int = 0  # seconds, when not allowed


_ENSURE = Prepared(
    "INSERT INTO rate_windows (key_id, minute, n, prev_n) VALUES (:k, :w, 0, 0) ON CONFLICT (key_id) DO NOTHING")
# Roll the row into this minute: last minute's count becomes prev_n; older counts are gone.
_ROLL = Prepared(
    "UPDATE rate_windows SET prev_n = CASE WHEN minute = :w - 1 THEN n ELSE 0 END, n = 0, minute = :w "
    "WHERE key_id = :k AND minute <> :w")
_TAKE = Prepared(
    "UPDATE rate_windows SET n = n + 1 WHERE key_id = :k AND minute = :w AND prev_n * :weight + n + 1 <= :rpm")
_READ = Prepared("SELECT n, prev_n FROM rate_windows WHERE key_id = :k")


def take(conn: Transaction, check: RateCheck) -> RateResult:
    """Count one request for the key if the limit allows it (on PostgreSQL the same statements run
    in the server, `pgbatch`; `batches.take_rate` picks)."""
    w, _, weight = window(check)
    key = {"k": check.key_id, "w": w}
    conn.execute(_ENSURE, key)
    conn.execute(_ROLL, key)
    if conn.execute(_TAKE, {**key, "weight": weight, "rpm": check.rpm}).rowcount:
        return RateResult(True)
    row = conn.execute(_READ, {"k": check.key_id}).one()
    return refused(check, int(row.n), int(row.prev_n))


def window(check: RateCheck) -> tuple[int, float, float]:
    """This minute (since the epoch), how far into it `now` is (0..1), and the previous minute's weight."""
    t = check.now.timestamp()
    into = (t % WINDOW_SECONDS) / WINDOW_SECONDS
    return int(t // WINDOW_SECONDS), into, 1.0 - into  # the share of the previous minute still inside the last 60 s


def refused(check: RateCheck, n: int, prev: int) -> RateResult:
    """The refusal, with when to retry, given this minute's count `n` and the previous one's `prev`."""
    _, into, weight = window(check)
    if n + 1 > check.rpm or prev == 0:
        # This minute is full. After its end it is the previous minute, and still weighs n * weight:
        # one more fits once n * (1 - x) + 1 <= rpm, x into the next minute.
        later = max(0.0, 1.0 - (check.rpm - 1) / n) if n else 0.0
        retry = math.ceil((1.0 - into + later) * WINDOW_SECONDS)
    else:
        # The previous minute's share falls off as time passes: when does prev * weight + n + 1 fit?
        need = (check.rpm - n - 1) / prev  # the weight at which one more fits
        retry = math.ceil((weight - need) * WINDOW_SECONDS)
    return RateResult(False, max(1, retry))
