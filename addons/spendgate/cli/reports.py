"""`spendgate audit` and `spendgate usage`: what happened, and what it cost."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from spendgate.cli.common import ConfigOpt, FormatOpt, SinceOpt, UntilOpt, open_db, settings_from, usd_cell
from spendgate.cli.render import Format, render
from spendgate.store.audit import COLUMNS, AuditLog
from spendgate.store.keys import KeyStore
from spendgate.store.reports import Reports

# The audit row's own fields, with money shown as USD.
AUDIT_COLUMNS = [("cost_usd" if c == "cost_nusd" else c) for c in COLUMNS if c != "instance_id"]
AUDIT_TABLE_COLUMNS = ["started_at", "user", "provider", "model_requested", "outcome", "status_code", "input_tokens",
                       "output_tokens", "usage_source", "cost_usd", "latency_ms", "id"]


class OutcomeChoice(str, Enum):
    """The audit record's outcomes (the contract's list; a test keeps it equal to the stages' `Outcome`)."""

    completed = "completed"
    upstream_error = "upstream_error"
    client_aborted = "client_aborted"
    blocked_auth = "blocked_auth"
    blocked_cap = "blocked_cap"
    blocked_rate = "blocked_rate"
    blocked_policy = "blocked_policy"
    gateway_error = "gateway_error"
    incomplete = "incomplete"


def audit(
    admin: Annotated[bool, typer.Option("--admin", help="Admin actions instead of requests.")] = False,
    user: Annotated[Optional[str], typer.Option("--user")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    outcome: Annotated[Optional[OutcomeChoice], typer.Option(
        "--outcome", metavar="OUTCOME", help=f"Only these: {', '.join(o.value for o in OutcomeChoice)}.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many rows, newest first.")] = 100,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """One row per request (or per admin action with --admin)."""
    db = open_db(settings_from(config))
    if admin:
        rows = [ev.model_dump() for ev in KeyStore(db).admin_events(since, until, limit)]
        render(rows, ["id", "at", "actor", "action", "target", "before", "after"], fmt, title="Admin events")
        return
    rows = []
    for r in AuditLog(db).rows(user=user, since=since, until=until, outcome=outcome.value if outcome else None,
                               limit=limit):
        d = dataclasses.asdict(r)
        d["cost_usd"] = usd_cell(d.pop("cost_nusd"))
        rows.append(d)
    render(rows, AUDIT_COLUMNS if fmt is not Format.table else AUDIT_TABLE_COLUMNS, fmt, title="Requests")


class GroupBy(str, Enum):
    user = "user"
    team = "team"
    model = "model"
    provider = "provider"
    day = "day"


def usage(
    by: Annotated[GroupBy, typer.Option("--by")] = GroupBy.user,
    since: SinceOpt = None,
    until: UntilOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Spend and tokens by user, team, model, provider or day (sums of the audit rows, exact)."""
    rows = Reports(open_db(settings_from(config))).usage_report(by.value, since, until)
    total: dict[str, Any] = {"key": "TOTAL"}
    for r in rows:
        r[by.value] = r.pop("key")
        for k, v in r.items():
            if k not in (by.value,) and isinstance(v, int):
                total[k] = total.get(k, 0) + v
    out = []
    for r in rows + ([{**{k: v for k, v in total.items() if k != "key"}, by.value: "TOTAL"}]
                     if rows and fmt is Format.table else []):
        r = dict(r)
        r["cost_usd"] = usd_cell(r.pop("cost_nusd", 0))
        out.append(r)
    cols = [by.value, "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
            "reasoning_tokens", "cost_usd", "unpriced"]
    render(out, cols, fmt, title=f"Usage by {by.value}")
