"""Stage: count each finished request in Prometheus (after `Record` has completed its row)."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from spendgate.metrics import TOKEN_KINDS, Metrics
from spendgate.money import as_float
from spendgate.stages.call import Call, Outcome


class MetricsStage:
    def __init__(self, metrics: Metrics, model_label: Callable[[str, str | None], str]) -> None:
        self.m = metrics
        self.model_label = model_label

    def finish(self, flow: http.HTTPFlow, call: Call) -> None:
        row = call.audit.row
        if row is None:
            return
        user = call.key.user if call.key else "unknown"
        team = (call.key.team if call.key else None) or "none"
        provider = call.provider.name
        model = self.model_label(provider, row.model_reported or call.model_requested)
        outcome = Outcome(row.outcome)
        child = self.m.child
        child(self.m.requests, user, team, provider, model, outcome).inc()
        if outcome.blocked:
            child(self.m.blocked, user, outcome.removeprefix("blocked_")).inc()
        for kind in TOKEN_KINDS:
            n = getattr(row, f"{kind}_tokens")
            if n:
                child(self.m.tokens, user, team, provider, model, kind).inc(n)
        if row.cost_nusd:
            child(self.m.cost, user, team, provider, model).inc(as_float(row.cost_nusd))
        if row.latency_ms is not None and not outcome.blocked:
            child(self.m.duration, provider, model).observe(row.latency_ms / 1000)
        if row.ttft_ms is not None:
            child(self.m.ttft, provider, model).observe(row.ttft_ms / 1000)
        child(self.m.overhead, provider).observe(call.timing.overhead)
