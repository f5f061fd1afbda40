"""Stage: hand cap blocks, raw provider keys and unpriced models to the alert evaluator
(in-memory appends, O(1))."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from mitmproxy import http

from spendgate.pricing import CostSource
from spendgate.stages.call import Call, Outcome
from spendgate.store.budgets import Blocked


class Observer(Protocol):
    """What the feed tells the evaluator (`spendgate.alerts.evaluator.AlertEvaluator`)."""

    def observe_cap_block(self, cap: Blocked, user: str | None, team: str | None, provider: str) -> None: ...

    def observe_shadow(self, user: str | None, team: str | None, provider: str, passthrough: bool,
                       at: datetime) -> None: ...

    def observe_unpriced(self, provider: str, model: str) -> None: ...


class AlertFeed:
    def __init__(self, alerts: Observer) -> None:
        self.alerts = alerts

    def finish(self, flow: http.HTTPFlow, call: Call) -> None:
        user = call.key.user if call.key else None
        team = call.key.team if call.key else None
        if call.outcome is Outcome.BLOCKED_CAP and call.blocked is not None:
            self.alerts.observe_cap_block(call.blocked, user, team, call.provider.name)
        elif call.byok_passthrough or call.error == "spendgate_foreign_key":
            self.alerts.observe_shadow(user, team, call.provider.name, call.byok_passthrough, call.started_at)
        unpriced = call.error == "spendgate_unpriced_model"
        if unpriced or (call.metering.cost_source is CostSource.UNKNOWN and call.metering.usage is not None):
            self.alerts.observe_unpriced(call.provider.name, call.model_requested or "(none)")
