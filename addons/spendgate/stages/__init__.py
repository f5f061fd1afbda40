"""The request's path: one mitmproxy addon per stage, run in list order by the `Pipeline`.

    tls → routing → onboarding files → identity → destinations → rate limit → policy → sockets → budget → meter
        → record → budget admission → forward → metrics → alerts

`Budgets` decides what to hold, `Record` commits the write-ahead audit row with that reservation
(one round trip to the store), `BudgetAdmission` admits or refuses on its result, and `Forward`
sets the upstream key last, on a request every stage let go.

Within one mitmproxy event the stages run in this order: a refusal by an early stage is seen
by the later ones (`flow.response` is set) and they step aside. When a request ends, each
stage's `finish` runs once, in the same order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Protocol

from spendgate.access import DestinationPolicy
from spendgate.metrics import Metrics
from spendgate.pricing import Pricer
from spendgate.settings import Settings
from spendgate.stages.alerts import AlertFeed, Observer
from spendgate.stages.budget import BudgetAdmission, Budgets, CapRules
from spendgate.stages.estimate import Estimator
from spendgate.stages.forward import Forward
from spendgate.stages.identity import Identity, Keys
from spendgate.stages.meter import Meter
from spendgate.stages.metrics import MetricsStage
from spendgate.stages.onboarding_files import OnboardingFiles
from spendgate.stages.policy import Policy
from spendgate.stages.ratelimit import RateLimit
from spendgate.stages.record import Record
from spendgate.stages.redaction import Redactor
from spendgate.stages.routing import Destinations, Routes, Routing, connect_targets, local_addresses
from spendgate.stages.sockets import Sockets
from spendgate.stages.tls import TlsPolicy
from spendgate.store.budgets import BudgetDef, ReserveRequest, ReserveResult
from spendgate.store.writer import AuditWriter


class Registry(Keys, Protocol):
    """Identity's key look-ups plus the caps that apply to a user (`spendgate.store.registry.KeyRegistry`)."""

    def budgets_for(self, user: str, team: str | None) -> Sequence[BudgetDef]: ...


def build_stages(
    settings: Settings,
    *,
    registry: Registry,
    writer: AuditWriter,
    reserve: Callable[[ReserveRequest], Awaitable[ReserveResult]],
    pricer: Pricer,
    hold: Callable[[str], None],
    release: Callable[[str], None],
    metrics: Metrics,
    model_label: Callable[[str, str | None], str],
    alerts: Observer | None,
    instance_id: str,
) -> list[object]:
    proxy, budgets = settings.proxy, settings.budgets
    routes = Routes(settings.providers)
    listens = [(proxy.listen.host, proxy.listen.port), (settings.metrics.listen.host, settings.metrics.listen.port)]
    targets = connect_targets()
    secrets = [s for p in settings.providers for s in (p.api_key, p.admin_api_key)]
    estimator = Estimator(budgets.default_max_output_tokens)
    ratelimit = RateLimit()
    caps = Budgets(registry.budgets_for, reserve, hold, pricer, estimator,
                   CapRules(timedelta(seconds=budgets.reservation_ttl_seconds), budgets.fail_closed,
                            budgets.clamp_output, budgets.min_output_tokens, frozenset(budgets.allow_unmetered)))
    record = Record(writer, instance_id, settings.audit.capture_content, budgets.fail_closed, release)
    admission = BudgetAdmission(caps)
    stages: list[object] = [
        TlsPolicy(routes.is_model_host, routes.verify_upstream),
        Routing(routes.provider_for, targets),
        OnboardingFiles.for_gateway(settings, targets),  # GET /spendgate/ca.pem, addressed to the proxy
        Identity(registry, routes.is_model_host, proxy.block_other_hosts),
        Destinations(DestinationPolicy.build(proxy.allow_ports, proxy.allow_destinations, listens),
                     routes.provider_for, routes.model_upstream, local_addresses(listens), targets),
        ratelimit,
        Policy(proxy.max_request_bytes),
        # A WebSocket's model calls are admitted by the same stages as a request, one by one.
        Sockets(registry, [ratelimit.requestheaders, caps.request, record.request, admission.request]),
        caps,
        Meter(pricer, estimator),
        record,
        admission,
        Forward(Redactor(secrets)),
        MetricsStage(metrics, model_label),
    ]
    if alerts is not None:
        stages.append(AlertFeed(alerts))
    return stages
