"""The `spendgate` command. Each group of commands is its own module; this wires them into one app."""

from __future__ import annotations

import typer

from spendgate.cli import admin, alerts, budgets, keys, reports

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Spendgate: per-user keys, audit and caps for model APIs.")
app.add_typer(keys.app, name="keys")
app.add_typer(budgets.app, name="budgets")
app.add_typer(alerts.app, name="alerts")
app.add_typer(admin.db_app, name="db")
for command in (admin.serve, admin.onboard, admin.ca, admin.purge, admin.doctor, reports.audit, reports.usage):
    app.command()(command)
