"""`spendgate budgets`: spend caps for users, teams and the whole organisation."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer
from rich.markup import escape

from spendgate.cli.common import ActorOpt, ConfigOpt, FormatOpt, Period, err, open_db, settings_from, usd_cell
from spendgate.cli.keys import _usd_option
from spendgate.cli.render import Format, render
from spendgate.money import usd_text
from spendgate.store import StoreError
from spendgate.store.budgets import BudgetLedger
from spendgate.store.keys import KeyStore

app = typer.Typer(no_args_is_help=True, help="Spend caps for users, teams and the whole org.")


class Scope(str, Enum):
    user = "user"
    team = "team"
    global_ = "global"


ScopeArg = Annotated[Scope, typer.Argument(metavar="user|team|global")]
NameArg = Annotated[Optional[str], typer.Argument(
    metavar="NAME", help="The user or team; none for the global (org-wide) cap.", show_default=False)]


def cap_name(command: str, scope: Scope, name: str | None) -> str:
    """The budget's name: the user or team, `global` for the one org-wide cap."""
    if scope is Scope.global_:
        if name not in (None, "global"):
            raise typer.BadParameter(f"the global cap has no name (got {name!r}): `spendgate budgets {command} global`",
                                     param_hint="NAME")
        return "global"
    if not name:
        raise typer.BadParameter(f"name the {scope.value}: `spendgate budgets {command} {scope.value} NAME`",
                                 param_hint="NAME")
    return name


def _label(scope: Scope, name: str) -> str:
    return "global" if scope is Scope.global_ else f"{scope.value} {name}"


@app.command("set")
def budgets_set(
    scope: ScopeArg,
    cap: Annotated[str, typer.Option("--cap", help="Cap in USD.")],
    period: Annotated[Period, typer.Option("--period")],
    name: NameArg = None,
    config: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Set (or change) a cap; takes effect on every gateway within a second."""
    target = cap_name("set", scope, name)
    nano = _usd_option(cap)
    store = KeyStore(open_db(settings_from(config)))
    try:
        store.set_budget(scope.value, target, nano, period.value, actor=actor)
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    print(f"cap for {_label(scope, target)}: ${usd_text(nano)} per {period.value}")


@app.command("delete")
def budgets_delete(
    scope: ScopeArg,
    name: NameArg = None,
    config: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Remove a cap (recorded in the admin events); every gateway stops applying it within a second."""
    target = cap_name("delete", scope, name)
    if not KeyStore(open_db(settings_from(config))).delete_budget(scope.value, target, actor=actor):
        err.print(f"[red]no cap set for {escape(_label(scope, target))}[/red] (`spendgate budgets list` shows them)")
        raise typer.Exit(1)
    print(f"cap removed for {_label(scope, target)}")


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
