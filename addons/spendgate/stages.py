"""The gateway's stages in request order; `serve` and the mitmdump script both use this list."""

from __future__ import annotations

from typing import Any

from spendgate import edge
from spendgate.access import DestinationPolicy
from spendgate.budget import Budgets
from spendgate.forward import Forward
from spendgate.identity import Identity
from spendgate.meter import Meter
from spendgate.metrics import MetricsStage
from spendgate.policy import Policy
from spendgate.ratelimit import RateLimit
from spendgate.record import Record
from spendgate.redaction import Redactor
from spendgate.routing import Destinations, EdgeAnswers, Routing, connect_targets, local_addresses
from spendgate.settings import Settings
from spendgate.runtime import Runtime
from spendgate.tlspolicy import TlsPolicy


def build_stages(rt: Runtime) -> list[Any]:
    # Within one mitmproxy event the stages run in this order: a refusal by an early stage
    # is seen by the later ones (`flow.response` is set) and they step aside.
    proxy = rt.settings.proxy
    listens = [(proxy.listen.host, proxy.listen.port), (rt.settings.metrics_listen.host, rt.settings.metrics_listen.port)]
    policy = DestinationPolicy.build(proxy.allow_ports, proxy.allow_destinations, listens)
    targets = connect_targets()
    secrets = [s for p in rt.settings.providers for s in (p.api_key, p.admin_api_key)]
    return [
        TlsPolicy(rt.is_model_host, rt.verify_upstream), Routing(rt.provider_for_host, targets), Identity(rt),
        Destinations(policy, rt.provider_for_host, rt.model_upstream, local_addresses(listens), targets),
        RateLimit(), Policy(rt), Budgets(rt), Meter(rt, rt.pricer), Forward(Redactor(secrets)),
        Record(rt, rt.writer), MetricsStage(rt, rt.metrics, rt.model_labels),
    ]


def install_edge(settings: Settings) -> None:
    """mitmproxy's HTTP layer with the gateway's bounds (see `spendgate.edge`)."""
    p = settings.proxy
    edge.install(edge.Limits(p.max_request_bytes, p.max_header_bytes, p.header_timeout_seconds,
                             p.upstream_timeout_seconds, p.stream_idle_timeout_seconds), EdgeAnswers())
