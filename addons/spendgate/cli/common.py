"""What every command shares: options, reading the config, opening the database, parsing input."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from spendgate.cli.render import Format
from spendgate.money import usd
from spendgate.settings import ConfigError, Settings, load_settings
from spendgate.store import Database, SchemaError

err = Console(stderr=True, soft_wrap=True)  # a path or URL in a message is never broken across lines

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Config file (default: $SPENDGATE_CONFIG, ./spendgate.toml, built-ins).")]
FormatOpt = Annotated[Format, typer.Option("--format", help="table, json or csv.")]
ActorOpt = Annotated[Optional[str], typer.Option("--actor", help="Who is acting (default: the OS user).")]


def settings_from(config: Optional[Path]) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


def open_db(settings: Settings) -> Database:
    """The gateway's database, at the schema this Spendgate needs. Never migrates: a running gateway
    on a shared database must not have its schema changed under it (`spendgate db upgrade` does)."""
    db = Database(settings.database.url)
    try:
        db.require_current()
    except SchemaError as e:
        err.print(f"[red]database:[/red] {e}")
        raise typer.Exit(3) from None
    except Exception as e:
        err.print(f"[red]database error:[/red] cannot open {safe_url(settings.database.url)}: {type(e).__name__}: {e}")
        raise typer.Exit(3) from None
    return db


def safe_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", url)


_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)?$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration; write e.g. 30s, 15m, 24h, 7d")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return timedelta(seconds=n * _UNIT_SECONDS[unit])


def _iso_utc(text: str) -> datetime | None:
    """An ISO date or time, in UTC unless it says otherwise; None when it is not one."""
    try:
        d = datetime.fromisoformat(text)
    except ValueError:
        return None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


def parse_when(text: str) -> datetime:
    d = _iso_utc(text)
    if d is None:
        raise typer.BadParameter(f"{text!r} is not an ISO date or time, e.g. 2026-12-31 or 2026-12-31T18:00")
    return d


_AGO = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")  # a unit is required: "2026" alone is a year


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A listing's `--since` / `--until`: an ISO date or time (UTC unless it says), `7d`, `24h`,
    `30m` ago, or `today` / `yesterday` (from 00:00 UTC) or `now`."""
    now = now or datetime.now(timezone.utc)
    word = text.strip().lower()
    midnight = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if word in named:
        return named[word]
    m = _AGO.match(word)
    if m:
        return now - timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    d = _iso_utc(text.strip())
    if d is None:
        raise typer.BadParameter(f"{text!r} is not a time: write an ISO date or time (2026-12-31, "
                                 "2026-12-31T18:00), a span back from now (30m, 24h, 7d, 2w), today or yesterday")
    return d


_TIME_HELP = "ISO date or time (UTC), or 30m / 24h / 7d ago, or today / yesterday."
SinceOpt = Annotated[Optional[datetime], typer.Option("--since", parser=parse_time, metavar="WHEN",
                                                      help=f"From this time on. {_TIME_HELP}")]
UntilOpt = Annotated[Optional[datetime], typer.Option("--until", parser=parse_time, metavar="WHEN",
                                                      help=f"Before this time. {_TIME_HELP}")]


class Period(str, Enum):
    day = "day"
    week = "week"
    month = "month"


def usd_cell(nano: Optional[int]) -> Optional[Decimal]:
    """Nano-USD as exact USD for listings (None stays None: an unknown cost is not $0)."""
    return None if nano is None else usd(nano)
