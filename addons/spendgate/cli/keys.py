"""`spendgate keys`: mint, list, revoke and rotate gateway keys."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.console import Console

from spendgate.cli.common import (
    ActorOpt,
    ConfigOpt,
    FormatOpt,
    Period,
    err,
    open_db,
    parse_duration,
    parse_when,
    settings_from,
)
from spendgate.cli.onboarding import onboard_lines
from spendgate.cli.render import Format, render
from spendgate.money import parse_usd
from spendgate.store import NotFound, StoreError
from spendgate.store.keys import KeyStore

app = typer.Typer(no_args_is_help=True, help="Mint, list, revoke and rotate gateway keys.")


@app.command("create")
def keys_create(
    user: str,
    team: Annotated[Optional[str], typer.Option("--team")] = None,
    cap: Annotated[Optional[str], typer.Option("--cap", help="Spend cap in USD for this user.")] = None,
    period: Annotated[Optional[Period], typer.Option("--period", help="The cap's period.")] = None,
    models: Annotated[Optional[list[str]], typer.Option("--models", help="Allowed model globs (repeat).")] = None,
    expires: Annotated[Optional[str], typer.Option("--expires", help="ISO date the key stops working.")] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    byok: Annotated[bool, typer.Option("--byok", help="Allow the user's own provider keys through.")] = False,
    capture_content: Annotated[bool, typer.Option("--capture-content", help="Store prompts and completions.")] = False,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", help="Why content is captured (required with --capture-content).")] = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
    actor: ActorOpt = None,
) -> None:
    """Mint a key for USER; it is printed once, with the lines the developer pastes."""
    if capture_content and not reason:
        raise typer.BadParameter("--capture-content needs --reason TEXT (it is recorded)", param_hint="--reason")
    if (cap is None) != (period is None):
        raise typer.BadParameter("--cap and --period go together, e.g. --cap 50 --period month", param_hint="--cap")
    settings = settings_from(config)
    store = KeyStore(open_db(settings))
    try:
        key_id, key = store.create_key(
            user, team=team, models=models or (), expires_at=parse_when(expires) if expires else None, rpm=rpm,
            byok=byok, capture_content=capture_content, capture_reason=reason, actor=actor,
            cap=(_usd_option(cap), period.value) if cap is not None and period is not None else None,
        )
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    lines = onboard_lines(settings, user, key)
    if fmt is Format.json:
        print(json.dumps({"key": key, "key_id": key_id, "user": user, "team": team, "onboard": lines}))
        return
    out = Console()
    out.print(f"Key for [bold]{user}[/bold] (id {key_id}). It is shown only now:")
    print(key)
    out.print("\nThe developer pastes:")
    for line in lines:
        print(line)


@app.command("list")
def keys_list(config: ConfigOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Keys with user, team, state, created, last used, expiry. Never secrets."""
    store = KeyStore(open_db(settings_from(config)))
    rows = [asdict(k) for k in store.list_keys()]
    render(rows, ["key_id", "user", "team", "state", "created_at", "last_used_at", "expires_at", "models", "rpm",
                  "byok", "capture_content", "capture_reason"], fmt, title="Spendgate keys")


@app.command("revoke")
def keys_revoke(
    target: Annotated[str, typer.Argument(metavar="KEY_ID|USER")],
    config: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Revoke a key, or all of a user's keys; every gateway stops accepting them within a second."""
    store = KeyStore(open_db(settings_from(config)))
    try:
        done = store.revoke(target, actor=actor)
    except NotFound as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    print(f"revoked: {', '.join(done)}" if done else "nothing to revoke (already revoked)")


@app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: Annotated[str, typer.Option("--grace", help="How long the old secret keeps working, e.g. 15m, 24h.")] = "0s",
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
    actor: ActorOpt = None,
) -> None:
    """New secret for KEY_ID; the old one works for the grace period."""
    settings = settings_from(config)
    store = KeyStore(open_db(settings))
    try:
        key = store.rotate(key_id, parse_duration(grace), actor=actor)
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    user = next(k.user for k in store.list_keys() if k.key_id == key_id)
    lines = onboard_lines(settings, user, key)  # the developer's lines carry the key: they change with it
    if fmt is Format.json:
        print(json.dumps({"key": key, "key_id": key_id, "user": user, "grace": grace, "onboard": lines}))
    else:
        Console().print(f"New secret for {key_id} (old one valid for {grace}). Shown only now:")
        print(key)
        Console().print(f"\n{user} pastes these (or runs the setup script again with SPENDGATE_KEY=<new key>):")
        for line in lines:
            print(line)




def _usd_option(text: str) -> int:
    try:
        return parse_usd(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a non-negative amount in USD, e.g. 50 or 12.50",
                                 param_hint="--cap") from None
