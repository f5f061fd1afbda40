"""`spendgate budgets`: spend caps for users, teams and the whole organisation."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from spendgate.cli.common import ActorOpt, ConfigOpt, FormatOpt, err, open_db, settings_from, usd_cell
from spendgate.cli.keys import _usd_option
from spendgate.cli.render import Format, render
from spendgate.store import StoreError
from spendgate.store.budgets import BudgetLedger
from spendgate.store.keys import KeyStore

app = typer.Typer(no_args_is_help=True, help="Spend caps for users, teams and the whole org.")


class Scope(str, Enum):
    user = "user"
    team = "team"
    global_ = "global"


class Period(str, Enum):
    day = "day"
    week = "week"
    month = "month"


@app.command("set")
def budgets_set(
    scope: Scope,
    name: Annotated[str, typer.Argument(help="User or team name; `global` for the org-wide cap.")],
    cap: Annotated[str, typer.Option("--cap", help="Cap in USD.")],
    period: Annotated[Period, typer.Option("--period")],
    config: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Set (or change) a cap; takes effect on every gateway within a second."""
    store = KeyStore(open_db(settings_from(config)))
    try:
        store.set_budget(scope.value, "global" if scope is Scope.global_ else name, _usd_option(cap), period.value,
                         actor=actor)
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    print(f"cap for {scope.value} {name}: ${cap} per {period.value}")


@app.command("list")
def budgets_list(config: ConfigOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Each cap with spent (settled), reserved (in flight), cap and when it resets."""
    ledger = BudgetLedger(open_db(settings_from(config)))
    rows = []
    for b in ledger.budget_status():
        cap = b["cap_nusd"]
        spent = b["spent_nusd"]
        rows.append({
            "scope": b["scope"], "name": b["name"], "period": b["period"], "spent_usd": usd_cell(spent),
            "reserved_usd": usd_cell(b["reserved_nusd"]), "cap_usd": usd_cell(cap),
            "percent": round(100 * spent / cap, 1) if cap else None, "resets_at": b["resets_at"],
        })
    render(rows, ["scope", "name", "period", "spent_usd", "reserved_usd", "cap_usd", "percent", "resets_at"], fmt,
           title="Budgets")
