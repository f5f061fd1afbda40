"""What the request path tells the alert evaluator: small immutable events, queued in O(1)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from spendgate.store.budgets import Blocked

__all__ = ["CapEvent", "Event", "ShadowEvent", "UnpricedEvent"]


@dataclass(frozen=True)
class CapEvent:
    cap: Blocked
    user: str | None
    team: str | None
    provider: str


@dataclass(frozen=True)
class ShadowEvent:
    user: str | None
    team: str | None
    provider: str
    passthrough: bool
    at: datetime


@dataclass(frozen=True)
class UnpricedEvent:
    provider: str
    model: str


Event = CapEvent | ShadowEvent | UnpricedEvent
