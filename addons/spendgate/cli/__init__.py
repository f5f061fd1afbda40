"""The `spendgate` command. Each group of commands is its own module; this wires them into one app."""

from __future__ import annotations

from typing import Annotated

import typer

from spendgate import __version__
from spendgate.cli import admin, alerts, budgets, keys, onboarding, reports

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Spendgate: per-user keys, audit and caps for model APIs.")


def _print_version(value: bool) -> None:
    if value:
        print(f"spendgate {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Spendgate: per-user keys, audit and caps for model APIs."""


app.add_typer(keys.app, name="keys")
app.add_typer(budgets.app, name="budgets")
app.add_typer(alerts.app, name="alerts")
app.add_typer(admin.db_app, name="db")
for command in (admin.serve, onboarding.onboard, admin.ca, admin.purge, admin.doctor, reports.audit, reports.usage):
    app.command()(command)
