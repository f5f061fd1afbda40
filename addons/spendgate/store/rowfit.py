"""Audit values made to fit their columns before they reach the database.

One request with a 5,000-character model name, a NUL byte or a lone surrogate in a field must
not cost it (or, through a failed group commit, other requests) its audit row: strings are cut
to their column width and cleaned of what PostgreSQL or UTF-8 refuse, integers are clamped to
their column type, and the row names what was cut (the caller records it in `cut_fields`).
"""

from __future__ import annotations

from typing import Any, Iterable

import sqlalchemy as sa

TEXT_LIMIT = 4000  # unbounded TEXT columns (path, error) are still kept readable
_INT_RANGE = {sa.Integer: (-(2**31), 2**31 - 1), sa.BigInteger: (-(2**63), 2**63 - 1)}


def _clean(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud800"
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class RowFitter:
    """Knows each column's width and type once; `fit` runs on every audit row."""

    def __init__(self, table: sa.Table) -> None:
        self._text: dict[str, int] = {}
        self._ints: dict[str, tuple[int, int]] = {}
        for col in table.columns:
            t = col.type
            if isinstance(t, sa.String):
                self._text[col.name] = t.length or TEXT_LIMIT
            else:
                for kind, bounds in _INT_RANGE.items():
                    if type(t) is kind:
                        self._ints[col.name] = bounds
        self._plans: dict[tuple[str, ...] | None, tuple[list[tuple[str, int]], list[tuple[str, tuple[int, int]]]]] = {}

    def fit(self, row: Any, names: Iterable[str] | None = None) -> set[str]:
        """Fit the attributes `names` of `row` (default: every column) in place; returns the
        names of those that had to change."""
        cut: set[str] = set()
        texts, ints = self._plan(None if names is None else tuple(names))
        for name, width in texts:
            value = getattr(row, name)
            if not isinstance(value, str):
                continue
            # Nearly every value is short ASCII without NUL: checked in C, no copy made.
            if len(value) <= width and value.isascii() and "\x00" not in value:
                continue
            clean = _clean(value)[:width]
            if clean != value:
                setattr(row, name, clean)
                cut.add(name)
        for name, (lo, hi) in ints:
            value = getattr(row, name)
            if isinstance(value, int) and not isinstance(value, bool) and not lo <= value <= hi:
                setattr(row, name, min(max(value, lo), hi))
                cut.add(name)
        return cut

    def _plan(self, names: tuple[str, ...] | None
              ) -> tuple[list[tuple[str, int]], list[tuple[str, tuple[int, int]]]]:
        """The text and integer columns among `names` (None: all), worked out once per tuple of names."""
        plan = self._plans.get(names)
        if plan is None:
            wanted = [*self._text, *self._ints] if names is None else names
            plan = self._plans[names] = ([(n, self._text[n]) for n in wanted if n in self._text],
                                         [(n, self._ints[n]) for n in wanted if n in self._ints])
        return plan
