"""Slack alerts: what to send and when (`evaluator`), how it reads (`messages`), delivery (`slack`)
and the provider backstop (`backstop`). Never on the request path."""

from __future__ import annotations

import logging
from collections.abc import Callable

from spendgate.alerts.backstop import Backstop, backstop_providers
from spendgate.alerts.evaluator import AlertEvaluator
from spendgate.alerts.slack import SlackSender, is_configured
from spendgate.metrics import Metrics
from spendgate.settings import Settings
from spendgate.store.alerts import AlertMarks
from spendgate.store.reports import Reports

log = logging.getLogger(__name__)


def start(settings: Settings, marks: AlertMarks, reports: Reports, team_of: Callable[[str], str | None],
          metrics: Metrics, writer_healthy: Callable[[], bool], instance: str) -> AlertEvaluator | None:
    """Build and start the sender, evaluator and backstop threads; None when Slack is not configured.

    The caller registers `AlertEvaluator.on_store_error` with the audit writer."""
    slack = settings.alerts.slack
    if not is_configured(slack):
        if slack.webhook_url is None and slack.bot_token and not slack.channel:
            log.warning("alerts.slack.bot_token is set but alerts.slack.channel is not: Slack alerts are off")
        return None
    sender = SlackSender(slack, metrics, marks)
    ev = AlertEvaluator(settings, marks, reports, team_of, sender.submit, writer_healthy=writer_healthy,
                        instance=instance or None)
    ev.sender = sender
    providers = backstop_providers(settings)
    if providers:
        ev.backstop = Backstop(settings, reports, ev.emit)
    ev.start()
    log.info("Slack alerts on (%s)%s", sender.via,
             f"; provider backstop for {', '.join(p.name for p in providers)}" if ev.backstop else "")
    return ev
