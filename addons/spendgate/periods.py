"""Budget periods: UTC day, ISO week (from Monday) and calendar month."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

PERIODS = ("day", "week", "month")


def period_start(period: str, now: datetime) -> datetime:
    """
    >>> period_start("week", datetime(2026, 11, 25, 13, 0, tzinfo=timezone.utc)).isoformat()
    '2026-11-23T00:00:00+00:00'
    """
    now = now.astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}; use day, week or month")


def period_end(period: str, now: datetime) -> datetime:
    start = period_start(period, now)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
