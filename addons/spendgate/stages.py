"""The gateway's stages in request order; `serve` and the mitmdump script both use this list."""

from __future__ import annotations

from typing import Any

from spendgate.budget import Budgets
from spendgate.forward import Forward
from spendgate.identity import Identity
from spendgate.meter import Meter
from spendgate.metrics import MetricsStage
from spendgate.policy import Policy
from spendgate.ratelimit import RateLimit
from spendgate.record import Record
from spendgate.runtime import Runtime
from spendgate.tlspolicy import TlsPolicy


def build_stages(rt: Runtime) -> list[Any]:
    # Within one mitmproxy event the stages run in this order: a refusal by an early stage
    # is seen by the later ones (`flow.response` is set) and they step aside.
    return [
        TlsPolicy(rt), Identity(rt), RateLimit(), Policy(rt), Budgets(rt),
        Meter(rt, rt.pricer), Forward(rt), Record(rt, rt.writer), MetricsStage(rt, rt.metrics, rt.model_labels),
    ]
