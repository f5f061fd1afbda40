"""`spendgate alerts`: send a Slack test message, list what was sent."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from spendgate.alerts.messages import hello_alert
from spendgate.alerts.slack import AlertDeliveryError, SlackSender, is_configured
from spendgate.cli.common import ConfigOpt, FormatOpt, SinceOpt, err, open_db, settings_from
from spendgate.cli.render import Format, render
from spendgate.store.alerts import AlertMarks

app = typer.Typer(no_args_is_help=True, help="Slack alerts: send a test message, list what was sent.")


class Kind(str, Enum):
    """The kinds of alert `spendgate.alerts.messages` sends (a test keeps the two equal)."""

    threshold = "threshold"
    cap_blocked = "cap_blocked"
    spike = "spike"
    backstop = "backstop"
    shadow_traffic = "shadow_traffic"
    unpriced_model = "unpriced_model"
    store_failing = "store_failing"
    test = "test"


@app.command("test")
def alerts_test(config: ConfigOpt = None) -> None:
    """Send a test message to the configured Slack webhook or channel; exit 1 if it was not delivered."""
    settings = settings_from(config)
    if not is_configured(settings.alerts.slack):
        err.print("[red]Slack is not configured:[/red] set alerts.slack.webhook_url, or bot_token and channel")
        raise typer.Exit(2)
    sender = SlackSender(settings.alerts.slack)
    try:
        sender.deliver(hello_alert())
    except AlertDeliveryError as e:
        err.print(f"[red]not delivered[/red] ({sender.via}): {e}")
        raise typer.Exit(1) from None
    print(f"test message delivered ({sender.via})")


@app.command("list")
def alerts_list(
    kind: Annotated[Optional[Kind], typer.Option("--kind")] = None,
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 100,
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Alerts sent (or folded, or failed), newest first; `count` is how often the event occurred."""
    marks = AlertMarks(open_db(settings_from(config)))
    rows = [a.model_dump() for a in marks.recent(kind=kind.value if kind else None, since=since, limit=limit)]
    cols = ["sent_at", "kind", "scope", "name", "status", "count", "attempts", "last_at", "dedupe_key", "text", "error"]
    render(rows, cols if fmt is not Format.table else ["sent_at", "kind", "scope", "name", "status", "count", "text"],
           fmt, title="Slack alerts")
