"""spendgate.cli.render: every value in full, in every format. Money as plain decimals, CSV cells
without Python reprs, a piped table as wide as its content, data never read as Rich markup."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from spendgate.cli.render import Format, plain_decimal, render, text_value
from spendgate.money import usd

AT = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


@pytest.mark.parametrize(("d", "text"), [
    (usd(1), "0.000000001"),  # str() gives 1E-9
    (usd(100), "0.0000001"),
    (Decimal("1E+3"), "1000"),
    (usd(1_000_000_000_000), "1000"),
    (Decimal("12.50"), "12.50"),
    (Decimal("-0"), "0"),
    (Decimal(0), "0"),
])
def test_plain_decimal(d: Decimal, text: str) -> None:
    assert plain_decimal(d) == text


@pytest.mark.parametrize(("value", "cell"), [
    (None, ""),
    (True, "true"),
    (False, "false"),
    (Decimal("1E-9"), "0.000000001"),
    (AT, "2026-03-04T05:06:07+00:00"),
    (("gpt-4o*", "claude-*"), "gpt-4o*,claude-*"),
    ((), ""),
    ({"cap_usd": Decimal("1E+3"), "period": "day"}, '{"cap_usd": "1000", "period": "day"}'),
    (Format.csv, "csv"),
    (7, "7"),
])
def test_csv_cells_are_plain_text(value: Any, cell: str) -> None:
    assert text_value(value) == cell


ROWS = [
    {"key_id": "k" * 40, "user": "a-rather-long-user-name@example.com", "team": None, "byok": False,
     "cost_usd": usd(1), "cap_usd": Decimal("1E+3"), "models": ("gpt-4o*", "claude-*"), "created_at": AT,
     "note": "[red]not markup[/red] :smile:"},
    {"key_id": "z" * 40, "user": "b", "team": "t", "byok": True, "cost_usd": None, "cap_usd": usd(5 * 10**9),
     "models": (), "created_at": None, "note": ""},
]
COLUMNS = [*ROWS[0], "pad1", "pad2", "pad3", "pad4", "pad5", "pad6"]  # wider than any terminal default


def out(capsys: pytest.CaptureFixture[str], fmt: Format) -> str:
    render(ROWS, COLUMNS, fmt, title="Listing")
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt", list(Format))
def test_no_e_notation_and_no_reprs_in_any_format(capsys: pytest.CaptureFixture[str], fmt: Format) -> None:
    text = out(capsys, fmt)
    assert "0.000000001" in text and "1000" in text
    for bad in ("E-9", "E+3", "E+", "Decimal(", "None", "True", "False"):
        assert bad not in text, (bad, text)


def test_json_keeps_types_and_plain_money(capsys: pytest.CaptureFixture[str]) -> None:
    got = json.loads(out(capsys, Format.json))
    assert got[0]["cost_usd"] == "0.000000001" and got[0]["cap_usd"] == "1000" and got[1]["cap_usd"] == "5"
    assert got[0]["byok"] is False and got[0]["team"] is None and got[0]["models"] == ["gpt-4o*", "claude-*"]
    assert got[0]["created_at"] == AT.isoformat()


def test_csv_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(out(capsys, Format.csv))))
    assert rows[0]["key_id"] == "k" * 40 and rows[0]["byok"] == "false" and rows[0]["team"] == ""
    assert rows[1]["byok"] == "true" and rows[1]["cost_usd"] == "" and rows[1]["models"] == ""
    assert rows[0]["models"] == "gpt-4o*,claude-*" and rows[0]["note"] == ROWS[0]["note"]


def test_a_piped_table_is_as_wide_as_its_content(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # what a terminal-less environment often says
    text = out(capsys, Format.table)
    lines = text.splitlines()
    assert max(len(line) for line in lines) > 80
    body = [line for line in lines if "k" * 40 in line]
    assert len(body) == 1, "one row is one line: nothing folded or cut"
    for value in ("k" * 40, "z" * 40, "a-rather-long-user-name@example.com", "2026-03-04 05:06:07", "0.000000001",
                  "gpt-4o*,claude-*", *COLUMNS):
        assert value in text, value
    assert "…" not in text
    assert "[red]not markup[/red] :smile:" in text  # shown as given, not styled or turned into an emoji
