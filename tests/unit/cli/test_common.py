"""spendgate.cli.common: the times listings take (`--since` / `--until`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import typer

from spendgate.cli.common import parse_time

UTC = timezone.utc
NOW = datetime(2026, 5, 17, 13, 45, 30, tzinfo=UTC)
MIDNIGHT = datetime(2026, 5, 17, tzinfo=UTC)


@pytest.mark.parametrize(("text", "when"), [
    ("7d", NOW - timedelta(days=7)),
    ("24h", NOW - timedelta(hours=24)),
    ("30m", NOW - timedelta(minutes=30)),
    ("45s", NOW - timedelta(seconds=45)),
    ("2w", NOW - timedelta(weeks=2)),
    (" 3 h ", NOW - timedelta(hours=3)),
    ("today", MIDNIGHT),
    ("Today", MIDNIGHT),
    ("yesterday", MIDNIGHT - timedelta(days=1)),
    ("now", NOW),
    ("2026-05-01", datetime(2026, 5, 1, tzinfo=UTC)),  # ISO dates are UTC unless they say
    ("2026-05-01T18:00", datetime(2026, 5, 1, 18, tzinfo=UTC)),
    ("2026-05-01T18:00:00+02:00", datetime(2026, 5, 1, 16, tzinfo=UTC)),
    ("2026-05-01T16:00:00.123456+00:00", datetime(2026, 5, 1, 16, 0, 0, 123456, tzinfo=UTC)),
])
def test_parse_time(text: str, when: datetime) -> None:
    got = parse_time(text, now=NOW)
    assert got == when and got.tzinfo is not None


def test_today_is_the_utc_day_whatever_the_clock_zone() -> None:
    late = datetime(2026, 5, 17, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # 04:30 UTC on the 18th
    assert parse_time("today", now=late) == datetime(2026, 5, 18, tzinfo=UTC)


@pytest.mark.parametrize("text", ["7", "7 days", "7y", "-1d", "tomorrow", "", "2026-13-01", "last week"])
def test_what_is_not_a_time_says_what_is(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="30m, 24h, 7d") as e:
        parse_time(text, now=NOW)
    assert "ISO date" in str(e.value) and "today" in str(e.value)
