"""The `spendgate` command: serve, keys, onboarding, doctor, migrations, audit."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from spendgate.render import Format, render
from spendgate.settings import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="Spendgate: per-user keys, audit and caps for model APIs.")
keys_app = typer.Typer(no_args_is_help=True, help="Mint, list, revoke and rotate gateway keys.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")

err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Config file (default: $SPENDGATE_CONFIG, ./spendgate.toml, built-ins).")]
FormatOpt = Annotated[Format, typer.Option("--format", help="table, json or csv.")]
ActorOpt = Annotated[Optional[str], typer.Option("--actor", help="Who is acting (default: the OS user).")]


def _settings(config: Optional[Path]) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from spendgate.store import Store

    store = Store(settings.database_url)
    try:
        if store.current_revision() != store.head_revision():
            store.upgrade()
    except Exception as e:
        err.print(f"[red]database error:[/red] cannot open {_safe_url(settings.database_url)}: {type(e).__name__}: {e}")
        raise typer.Exit(3) from None
    return store


def _safe_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", url)


_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w)?$")


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration; write e.g. 30s, 15m, 24h, 7d")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


def parse_when(text: str) -> datetime:
    try:
        d = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO date or time, e.g. 2026-12-31 or 2026-12-31T18:00") from None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


# -- serve --------------------------------------------------------------------


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Start the gateway (mitmproxy embedded) and its metrics endpoint."""
    settings = _settings(config)
    from spendgate.serve import serve as run

    run(settings)


# -- keys ---------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    user: str,
    team: Annotated[Optional[str], typer.Option("--team")] = None,
    cap: Annotated[Optional[str], typer.Option("--cap", help="Spend cap in USD for this user.")] = None,
    period: Annotated[Optional[str], typer.Option("--period", help="day, week or month.")] = None,
    models: Annotated[Optional[list[str]], typer.Option("--models", help="Allowed model globs (repeat).")] = None,
    expires: Annotated[Optional[str], typer.Option("--expires", help="ISO date the key stops working.")] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    byok: Annotated[bool, typer.Option("--byok", help="Allow the user's own provider keys through.")] = False,
    capture_content: Annotated[bool, typer.Option("--capture-content", help="Store prompts and completions.")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why content is captured (required with --capture-content).")] = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
    actor: ActorOpt = None,
) -> None:
    """Mint a key for USER; it is printed once, with the lines the developer pastes."""
    if capture_content and not reason:
        raise typer.BadParameter("--capture-content needs --reason TEXT (it is recorded)", param_hint="--reason")
    if (cap is None) != (period is None):
        raise typer.BadParameter("--cap and --period go together, e.g. --cap 50 --period month", param_hint="--cap")
    settings = _settings(config)
    store = _store(settings)
    from spendgate.store import StoreError

    try:
        key_id, key = store.create_key(
            user, team=team, models=models or (), expires_at=parse_when(expires) if expires else None, rpm=rpm,
            byok=byok, capture_content=capture_content, capture_reason=reason, actor=actor,
            cap=(parse_usd(cap), period) if cap is not None and period is not None else None,
        )
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    from spendgate.onboarding import onboard_lines

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


def parse_usd(text: str) -> int:
    """USD text -> nano-USD, exactly."""
    from spendgate.pricing import parse_amount

    try:
        d = parse_amount(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a non-negative amount in USD, e.g. 50 or 12.50") from None
    return int((d * 1_000_000_000).to_integral_value())


def _set_budget(store, scope: str, name: str, cap: str, period: str, actor: Optional[str]) -> None:  # type: ignore[no-untyped-def]
    from spendgate.store import StoreError

    try:
        store.set_budget(scope, name, parse_usd(cap), period, actor=actor)
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None


budgets_app = typer.Typer(no_args_is_help=True, help="Spend caps for users, teams and the whole org.")
app.add_typer(budgets_app, name="budgets")


class Scope(str, Enum):
    user = "user"
    team = "team"
    global_ = "global"


class Period(str, Enum):
    day = "day"
    week = "week"
    month = "month"


@budgets_app.command("set")
def budgets_set(
    scope: Scope,
    name: Annotated[str, typer.Argument(help="User or team name; `global` for the org-wide cap.")],
    cap: Annotated[str, typer.Option("--cap", help="Cap in USD.")],
    period: Annotated[Period, typer.Option("--period")],
    config: ConfigOpt = None,
    actor: ActorOpt = None,
) -> None:
    """Set (or change) a cap; takes effect on every gateway within a second."""
    store = _store(_settings(config))
    _set_budget(store, scope.value, "global" if scope is Scope.global_ else name, cap, period.value, actor)
    print(f"cap for {scope.value} {name}: ${cap} per {period.value}")


@budgets_app.command("list")
def budgets_list(config: ConfigOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Each cap with spent (settled), reserved (in flight), cap and when it resets."""
    store = _store(_settings(config))
    rows = []
    for b in store.budget_status():
        cap = b["cap_nusd"]
        spent = b["spent_nusd"]
        rows.append({
            "scope": b["scope"], "name": b["name"], "period": b["period"], "spent_usd": usd(spent),
            "reserved_usd": usd(b["reserved_nusd"]), "cap_usd": usd(cap),
            "percent": round(100 * spent / cap, 1) if cap else None, "resets_at": b["resets_at"],
        })
    render(rows, ["scope", "name", "period", "spent_usd", "reserved_usd", "cap_usd", "percent", "resets_at"], fmt,
           title="Budgets")


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Keys with user, team, state, created, last used, expiry. Never secrets."""
    store = _store(_settings(config))
    rows = [asdict(k) for k in store.list_keys()]
    render(rows, ["key_id", "user", "team", "state", "created_at", "last_used_at", "expires_at", "models", "rpm",
                  "byok", "capture_content", "capture_reason"], fmt, title="Spendgate keys")


@keys_app.command("revoke")
def keys_revoke(target: Annotated[str, typer.Argument(metavar="KEY_ID|USER")], config: ConfigOpt = None, actor: ActorOpt = None) -> None:
    """Revoke a key, or all of a user's keys; every gateway stops accepting them within a second."""
    from spendgate.store import NotFound

    store = _store(_settings(config))
    try:
        done = store.revoke(target, actor=actor)
    except NotFound as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    print(f"revoked: {', '.join(done)}" if done else "nothing to revoke (already revoked)")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: Annotated[str, typer.Option("--grace", help="How long the old secret keeps working, e.g. 15m, 24h.")] = "0s",
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
    actor: ActorOpt = None,
) -> None:
    """New secret for KEY_ID; the old one works for the grace period."""
    from spendgate.store import StoreError

    store = _store(_settings(config))
    try:
        key = store.rotate(key_id, parse_duration(grace), actor=actor)
    except StoreError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    if fmt is Format.json:
        print(json.dumps({"key": key, "key_id": key_id, "grace": grace}))
    else:
        Console().print(f"New secret for {key_id} (old one valid for {grace}). Shown only now:")
        print(key)


# -- onboarding, CA -----------------------------------------------------------


@app.command()
def onboard(user: str, config: ConfigOpt = None) -> None:
    """Print the environment lines a developer pastes (proxy and CA trust)."""
    from spendgate.onboarding import onboard_lines

    for line in onboard_lines(_settings(config), user):
        print(line)


@app.command()
def ca(config: ConfigOpt = None, pem: Annotated[bool, typer.Option("--pem", help="Print the PEM instead of the path.")] = False) -> None:
    """Print the gateway CA certificate's path (or PEM)."""
    from spendgate.onboarding import ensure_ca

    path = ensure_ca(_settings(config))
    print(path.read_text() if pem else path, end="" if pem else "\n")


@app.command()
def purge(
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time (ISO), for checks.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete captured content older than audit.content_retention_days (serve also does this hourly)."""
    settings = _settings(config)
    store = _store(settings)
    at = parse_when(now) if now else datetime.now(timezone.utc)
    n = store.purge_content(at - timedelta(days=settings.content_retention_days))
    print(f"purged captured content of {n} requests")


# -- db -----------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply schema migrations (Alembic)."""
    from spendgate.store import Store

    settings = _settings(config)
    store = Store(settings.database_url)
    before, after = store.upgrade()
    print(f"schema: {before or 'empty'} -> {after}")


# -- doctor -------------------------------------------------------------------


@app.command()
def doctor(config: ConfigOpt = None) -> None:
    """Check config, database, upstream keys, tokenizer data and CA; say what to fix."""
    from spendgate.doctor import run_checks

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


# -- audit --------------------------------------------------------------------


@app.command()
def audit(
    admin: Annotated[bool, typer.Option("--admin", help="Admin actions instead of requests.")] = False,
    user: Annotated[Optional[str], typer.Option("--user")] = None,
    since: Annotated[Optional[str], typer.Option("--since")] = None,
    until: Annotated[Optional[str], typer.Option("--until")] = None,
    outcome: Annotated[Optional[str], typer.Option("--outcome")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """One row per request (or per admin action with --admin)."""
    store = _store(_settings(config))
    s = parse_when(since) if since else None
    u = parse_when(until) if until else None
    if admin:
        rows = [ev.model_dump() for ev in store.admin_events(s, u, limit)]
        render(rows, ["id", "at", "actor", "action", "target", "before", "after"], fmt, title="Admin events")
        return
    rows = []
    for r in store.audit_rows(user=user, since=s, until=u, outcome=outcome, limit=limit):
        d = r.model_dump()
        d["cost_usd"] = usd(d.pop("cost_nusd"))
        rows.append(d)
    render(rows, AUDIT_COLUMNS if fmt is not Format.table else AUDIT_TABLE_COLUMNS, fmt, title="Requests")


AUDIT_COLUMNS = [
    "id", "started_at", "ended_at", "user", "team", "key_id", "provider", "host", "method", "path", "endpoint_kind",
    "model_requested", "model_reported", "stream", "status_code", "outcome", "input_tokens", "output_tokens",
    "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "usage_source", "cost_usd", "latency_ms",
    "ttft_ms", "request_bytes", "response_bytes", "client_addr", "user_agent", "upstream_request_id", "error",
    "content_captured", "cut_fields",
]
AUDIT_TABLE_COLUMNS = ["started_at", "user", "provider", "model_requested", "outcome", "status_code", "input_tokens",
                       "output_tokens", "usage_source", "cost_usd", "latency_ms", "id"]


def usd(nano: Optional[int]) -> Optional[Decimal]:
    """nano-USD integer -> Decimal USD, exact.

    >>> usd(12500)
    Decimal('0.0000125')
    """
    if nano is None:
        return None
    return (Decimal(nano) / Decimal(1_000_000_000)).normalize() if nano else Decimal(0)


class GroupBy(str, Enum):
    user = "user"
    team = "team"
    model = "model"
    provider = "provider"
    day = "day"


@app.command()
def usage(
    by: Annotated[GroupBy, typer.Option("--by")] = GroupBy.user,
    since: Annotated[Optional[str], typer.Option("--since")] = None,
    until: Annotated[Optional[str], typer.Option("--until")] = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Spend and tokens by user, team, model, provider or day (sums of the audit rows, exact)."""
    store = _store(_settings(config))
    rows = store.usage_report(by.value, parse_when(since) if since else None, parse_when(until) if until else None)
    total: dict[str, Any] = {"key": "TOTAL"}
    for r in rows:
        r[by.value] = r.pop("key")
        for k, v in r.items():
            if k not in (by.value,) and isinstance(v, int):
                total[k] = total.get(k, 0) + v
    out = []
    for r in rows + ([{**{k: v for k, v in total.items() if k != "key"}, by.value: "TOTAL"}] if rows and fmt is Format.table else []):
        r = dict(r)
        r["cost_usd"] = usd(r.pop("cost_nusd", 0))
        out.append(r)
    cols = [by.value, "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
            "reasoning_tokens", "cost_usd", "unpriced"]
    render(out, cols, fmt, title=f"Usage by {by.value}")


# -- alerts -------------------------------------------------------------------

alerts_app = typer.Typer(no_args_is_help=True, help="Slack alerts: send a test message, list what was sent.")
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("test")
def alerts_test(config: ConfigOpt = None) -> None:
    """Send a test message to the configured Slack webhook or channel; exit 1 if it was not delivered."""
    from spendgate.alerts import AlertDeliveryError, SlackSender, hello_alert, is_configured

    settings = _settings(config)
    if not is_configured(settings.slack):
        err.print("[red]Slack is not configured:[/red] set alerts.slack.webhook_url, or bot_token and channel")
        raise typer.Exit(2)
    sender = SlackSender(settings.slack)
    try:
        sender.deliver(hello_alert())
    except AlertDeliveryError as e:
        err.print(f"[red]not delivered[/red] ({sender.via}): {e}")
        raise typer.Exit(1) from None
    print(f"test message delivered ({sender.via})")


@alerts_app.command("list")
def alerts_list(
    kind: Annotated[Optional[str], typer.Option("--kind", help="threshold, cap_blocked, spike, backstop, shadow_traffic, store_failing.")] = None,
    since: Annotated[Optional[str], typer.Option("--since")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Alerts sent (or folded, or failed), newest first; `count` is how often the event occurred."""
    store = _store(_settings(config))
    rows = [a.model_dump() for a in store.list_alerts(kind=kind, since=parse_when(since) if since else None, limit=limit)]
    cols = ["sent_at", "kind", "scope", "name", "status", "count", "attempts", "last_at", "dedupe_key", "text", "error"]
    render(rows, cols if fmt is not Format.table else ["sent_at", "kind", "scope", "name", "status", "count", "text"],
           fmt, title="Slack alerts")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
