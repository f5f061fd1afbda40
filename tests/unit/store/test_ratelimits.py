"""spendgate.store.ratelimits: `--rpm` counted in the store every instance shares, on SQLite and
PostgreSQL: the sliding window made of two fixed minutes, the Retry-After it answers, and parallel
takes from separate connections (as separate gateway instances make them) admitting exactly `rpm`."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from spendgate.store import Database
from spendgate.store.batches import take_rate as take
from spendgate.store.ratelimits import WINDOW_SECONDS, RateCheck, RateResult

UTC = timezone.utc
T0 = datetime(2026, 5, 4, 10, 0, 0, tzinfo=UTC)  # the start of a minute


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def hit(db: Database, seconds: float, rpm: int, key: str = "key00001") -> RateResult:
    with db.transaction() as conn:
        return take(conn, RateCheck(key, rpm, at(seconds)))


def admitted(db: Database, seconds: float, rpm: int, tries: int, key: str = "key00001") -> int:
    return sum(hit(db, seconds, rpm, key).allowed for _ in range(tries))


def row(db: Database, key: str = "key00001") -> tuple[int, int, int]:
    with db.engine.connect() as conn:
        r = conn.execute(sa.text("SELECT minute, n, prev_n FROM rate_windows WHERE key_id = :k"), {"k": key}).one()
    return int(r.minute), int(r.n), int(r.prev_n)


def test_a_minute_admits_rpm_then_refuses_until_it_ends(db: Database) -> None:
    assert admitted(db, 0, rpm=5, tries=8) == 5
    refused = hit(db, 15, rpm=5)
    # This minute is full, and weighs on the next: 5 * (1 - x) + 1 <= 5 at x = 1/5 into it.
    assert refused == RateResult(False, 45 + 12)
    assert row(db) == (int(T0.timestamp()) // 60, 5, 0)  # refusals are not counted


@pytest.mark.parametrize(
    "into_next, fit",
    [
        (0, 0),  # all of the last minute still overlaps the window
        (30, 5),  # half of its 10 requests still count
        (45, 7),  # a quarter (2.5) still counts: 7 more fit under 10
        (59.9, 9),
    ],
)
def test_the_previous_minute_counts_by_how_much_of_it_is_still_in_the_window(db: Database, into_next: float,
                                                                           fit: int) -> None:
    assert admitted(db, 10, rpm=10, tries=10) == 10
    assert admitted(db, 60 + into_next, rpm=10, tries=20) == fit
    assert row(db)[1:] == (fit, 10)


def test_a_quiet_minute_forgets_everything_before_it(db: Database) -> None:
    assert admitted(db, 0, rpm=3, tries=3) == 3
    assert admitted(db, 125, rpm=3, tries=5) == 3  # two minutes later: nothing of the first still counts
    assert row(db)[1:] == (3, 0)


def test_keys_are_counted_apart(db: Database) -> None:
    assert admitted(db, 0, rpm=2, tries=3, key="aaaaaaaa") == 2
    assert admitted(db, 0, rpm=2, tries=3, key="bbbbbbbb") == 2


def test_a_lower_rpm_takes_effect_on_the_counts_so_far(db: Database) -> None:
    assert admitted(db, 0, rpm=10, tries=4) == 4
    assert hit(db, 1, rpm=3).allowed is False  # `keys` changed to --rpm 3: 4 already made


def test_retry_after_is_when_the_previous_minute_s_share_has_fallen_enough(db: Database) -> None:
    assert admitted(db, 0, rpm=10, tries=10) == 10
    # At 60 + 6 s, 90% of last minute's 10 still counts (9): 1 more fits, then none.
    assert admitted(db, 66, rpm=10, tries=2) == 1
    r = hit(db, 66, rpm=10)
    assert not r.allowed
    # One more fits when 10 * weight + 1 + 1 <= 10, i.e. weight <= 0.8: at 60 + 12 s.
    assert r.retry_after == 6
    assert hit(db, 66 + r.retry_after, rpm=10).allowed
    assert hit(db, 66 + r.retry_after, rpm=10).allowed is False


@pytest.mark.parametrize("rpm", [1, 2, 30])
def test_retry_after_a_full_minute_is_long_enough(db: Database, rpm: int) -> None:
    """A client that waits the Retry-After it was given gets in: a full minute still weighs on the
    next one, so its end alone is not enough."""
    assert admitted(db, 50, rpm=rpm, tries=rpm + 1) == rpm
    r = hit(db, 50, rpm=rpm)
    assert not r.allowed and r.retry_after >= 10
    assert hit(db, 50 + r.retry_after, rpm=rpm).allowed, r
    assert r.retry_after <= 10 + WINDOW_SECONDS / rpm + 1


def test_retry_after_is_at_least_a_second(db: Database) -> None:
    assert admitted(db, 59.999, rpm=1, tries=1) == 1
    r = hit(db, 59.9995, rpm=1)
    assert not r.allowed and r.retry_after >= 1


@pytest.mark.parametrize("rpm, clients", [(7, 24), (30, 40)])
def test_parallel_takes_from_separate_connections_admit_exactly_rpm(db: Database, rpm: int, clients: int) -> None:
    """Each thread is an instance with its own connection, all taking at the same moment: the
    conditional UPDATE serialises them on the key's row, so the total is rpm, not rpm per instance."""
    barrier = threading.Barrier(clients)
    results: list[RateResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def instance() -> None:
        try:
            barrier.wait(timeout=10)
            r = hit(db, 20, rpm)
            with lock:
                results.append(r)
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=instance) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(results) == clients
    assert sum(r.allowed for r in results) == rpm
    assert row(db)[1] == rpm
    (retry,) = {r.retry_after for r in results if not r.allowed}
    assert 40 < retry <= 40 + WINDOW_SECONDS / rpm + 1  # this minute's end, and the share it still weighs after
    assert hit(db, 20 + retry, rpm).allowed


def test_the_count_commits_with_its_transaction(db: Database) -> None:
    """Taken in the transaction that commits the begun audit row: a rolled-back begin costs nothing."""
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            assert take(conn, RateCheck("key00001", 1, at(0))).allowed
            raise RuntimeError("the audit insert failed")
    assert hit(db, 0, rpm=1).allowed
