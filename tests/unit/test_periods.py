"""spendgate.periods: budget periods (UTC day, ISO week, calendar month) meet at the UTC boundary."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from spendgate.periods import period_end, period_start

UTC = timezone.utc


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


# The first instant of a period, per period kind (the last instant of the previous one is 1 µs before).
BOUNDARIES = [
    pytest.param("day", utc(2026, 4, 1), id="day"),
    pytest.param("day", utc(2027, 1, 1), id="day-new-year"),
    pytest.param("week", utc(2026, 3, 30), id="week-sunday-to-monday"),
    pytest.param("week", utc(2027, 1, 4), id="week-across-new-year"),
    pytest.param("month", utc(2026, 2, 1), id="month"),
    pytest.param("month", utc(2028, 3, 1), id="month-leap-february"),
    pytest.param("month", utc(2027, 1, 1), id="month-december"),
]


@pytest.mark.parametrize("period,boundary", BOUNDARIES)
def test_period_start_and_end_meet_at_the_utc_boundary(period: str, boundary: datetime) -> None:
    last = boundary - timedelta(microseconds=1)
    assert period_end(period, last) == boundary
    assert period_start(period, boundary) == boundary
    assert period_start(period, last) < boundary
    # The same instant written in another time zone is in the same UTC period.
    for tz in (timezone(timedelta(hours=5)), timezone(timedelta(hours=-8))):
        assert period_start(period, last.astimezone(tz)) == period_start(period, last)
        assert period_start(period, boundary.astimezone(tz)) == boundary


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        period_start("fortnight", utc(2026, 4, 1))
