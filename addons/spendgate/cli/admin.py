"""`spendgate serve`, `ca`, `doctor`, `db upgrade`, `purge`: running and setting up."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Optional

import typer

from spendgate.cli.common import ConfigOpt, err, open_db, parse_when, settings_from
from spendgate.cli.doctor import run_checks
from spendgate.cli.onboarding import ensure_ca
from spendgate.settings import ConfigError, load_settings
from spendgate.store import Database, SchemaError
from spendgate.store.audit import AuditLog

db_app = typer.Typer(no_args_is_help=True, help="Database schema.")


def serve(config: ConfigOpt = None) -> None:
    """Start the gateway (mitmproxy embedded) and its metrics endpoint."""
    settings = settings_from(config)
    from spendgate.serve import serve as run  # mitmproxy takes ~0.5 s to import; only serve needs it

    try:
        run(settings)
    except SchemaError as e:  # a schema that is behind: refused like every other command, not a traceback
        err.print(f"[red]database:[/red] {e}")
        raise typer.Exit(3) from None


def ca(
    config: ConfigOpt = None,
    pem: Annotated[bool, typer.Option("--pem", help="Print the PEM instead of the path.")] = False,
) -> None:
    """Print the gateway CA certificate's path (or PEM)."""
    path = ensure_ca(settings_from(config))
    print(path.read_text() if pem else path, end="" if pem else "\n")


def purge(
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time (ISO), for checks.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete captured content older than audit.content_retention_days (serve also does this hourly)."""
    settings = settings_from(config)
    audit = AuditLog(open_db(settings))
    at = parse_when(now) if now else datetime.now(timezone.utc)
    n = audit.purge_content(at - timedelta(days=settings.audit.content_retention_days))
    print(f"purged captured content of {n} requests")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply schema migrations (Alembic)."""
    settings = settings_from(config)
    before, after = Database(settings.database.url).upgrade()
    print(f"schema: {before or 'empty'} -> {after}")


def doctor(config: ConfigOpt = None) -> None:
    """Check config, database, upstream keys, tokenizer data and CA; say what to fix."""
    try:
        settings = load_settings(config)
    except ConfigError as e:
        print(f"FAIL config: {e}")
        raise typer.Exit(1) from None
    ok = True
    for check in run_checks(settings):
        print(f"{check.status:4} {check.name}: {check.detail}")
        ok = ok and check.status != "FAIL"
    raise typer.Exit(0 if ok else 1)
