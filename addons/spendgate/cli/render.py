"""Listings as a Rich table, JSON or CSV (`--format`).

Every format shows every value in full: money as plain decimals (never `1E-7`), no Python reprs in
CSV cells (`true`, not `True`; empty, not `None`), and a table piped to a file or another program
as wide as its content needs, so key ids and other columns are never cut.
"""

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
from rich.text import Text


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def plain_decimal(d: Decimal) -> str:
    """`Decimal` as positional text: `str(Decimal("0.0000001"))` would be `1E-7`.

    >>> plain_decimal(Decimal("1E-7")), plain_decimal(Decimal("1E+3")), plain_decimal(Decimal("-0"))
    ('0.0000001', '1000', '0')
    """
    return format(d, "f") if d else "0"


def json_value(v: Any) -> Any:
    """A value as JSON shows it: money as a decimal string, times as ISO 8601, enums by value."""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, Decimal):
        return plain_decimal(v)
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (tuple, list)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    return v


def text_value(v: Any, table: bool = False) -> str:
    """A value as a CSV cell (or, with `table`, a table cell: times without the zone, in UTC)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S") if table else v.isoformat()
    if isinstance(v, Decimal):
        return plain_decimal(v)
    if isinstance(v, Enum):
        return str(v.value)
    if isinstance(v, (tuple, list)):
        return ",".join(text_value(x, table) for x in v)
    if isinstance(v, dict):
        return json.dumps(json_value(v), sort_keys=True)
    return str(v)


def table_of(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> Table:
    # Text, not str: a user or model name like "[red]" is data, not Rich markup.
    t = Table(title=Text(title) if title else None)
    for c in columns:
        t.add_column(Text(c), overflow="fold")  # a narrow terminal wraps a value; it never cuts it
    for r in rows:
        t.add_row(*[Text(text_value(r.get(c), table=True)) for c in columns])
    return t


def table_console(table: Table) -> Console:
    """The terminal's width on a terminal; elsewhere (a pipe, a file) as wide as the table is."""
    console = Console(highlight=False)
    if console.is_terminal:
        return console
    wide = Console(width=1_000_000, highlight=False, file=sys.stdout)
    return Console(width=max(20, wide.measure(table).maximum), highlight=False, file=sys.stdout)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: Format, title: str | None = None) -> None:
    if fmt is Format.json:
        json.dump([{c: json_value(r.get(c)) for c in columns} for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif fmt is Format.csv:
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        for r in rows:
            w.writerow([text_value(r.get(c)) for c in columns])
    else:
        t = table_of(rows, columns, title)
        table_console(t).print(t)
