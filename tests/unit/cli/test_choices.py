"""The CLI's lists of allowed values are the gateway's own: a value the gateway writes can be
asked for, and nothing else is accepted (a typo is an error naming the choices, not an empty list)."""

from __future__ import annotations

import ast
from pathlib import Path

import spendgate.alerts.messages as messages
from spendgate.cli.alerts import Kind
from spendgate.cli.budgets import Scope
from spendgate.cli.common import Period
from spendgate.cli.reports import OutcomeChoice
from spendgate.periods import PERIODS
from spendgate.stages.call import Outcome
from spendgate.store.keys import SCOPES


def test_outcomes_are_the_audit_records_outcomes() -> None:
    assert [o.value for o in OutcomeChoice] == [o.value for o in Outcome]


def alert_kinds() -> set[str]:
    """Every kind `spendgate.alerts.messages` builds: `kind="…"` arguments and `cls("…", …)` dedupe keys."""
    tree = ast.parse(Path(messages.__file__).read_text())
    kinds = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "kind" and isinstance(kw.value, ast.Constant):
                kinds.add(kw.value.value)
        if isinstance(node.func, ast.Name) and node.func.id == "cls" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                kinds.add(first.value)
    return kinds


def test_alert_kinds_are_the_kinds_sent() -> None:
    assert {"threshold", "cap_blocked", "spike", "shadow_traffic"} <= alert_kinds()  # the scan finds them
    assert {k.value for k in Kind} == alert_kinds()


def test_periods_and_scopes_are_the_stores() -> None:
    assert tuple(p.value for p in Period) == PERIODS
    assert tuple(s.value for s in Scope) == SCOPES

