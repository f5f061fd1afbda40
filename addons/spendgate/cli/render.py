"""Listings as a Rich table, JSON or CSV (`--format`)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _plain(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: Format, title: str | None = None) -> None:
    if fmt is Format.json:
        json.dump([{c: _plain(r.get(c)) for c in columns} for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif fmt is Format.csv:
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else _plain(r.get(c)) for c in columns])
    else:
        t = Table(title=title)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_cell(r.get(c)) for c in columns])
        Console().print(t)
