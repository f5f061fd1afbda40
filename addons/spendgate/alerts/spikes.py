"""Spend spikes: a user's last window against their own baseline, scaled to the window's length.

Pure detection; the evaluator decides what is a new episode and sends the alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from spendgate.money import dollars, to_nano
from spendgate.settings import SpikeSettings
from spendgate.store.reports import Reports

__all__ = ["Spike", "find_spikes"]


@dataclass(frozen=True)
class Spike:
    user: str
    requests: int
    cost_nusd: int
    usual_requests: float
    usual_cost_nusd: float
    reasons: str


def find_spikes(sp: SpikeSettings, reports: Reports, now: datetime) -> list[Spike]:
    """Users whose requests or spend in the last window exceed `factor` × their usual, by user name."""
    window = timedelta(seconds=sp.window_seconds)
    min_nusd = to_nano(sp.min_usd)
    recent = reports.activity_by_user(now - window)
    cands = {u: v for u, v in recent.items() if v[0] >= sp.min_requests or (min_nusd > 0 and v[1] >= min_nusd)}
    if not cands:
        return []
    base = reports.activity_by_user(now - timedelta(seconds=sp.baseline_seconds), now - window, users=list(cands))
    scale = sp.window_seconds / (sp.baseline_seconds - sp.window_seconds)
    found: list[Spike] = []
    for user, (n, cost) in sorted(cands.items()):
        bn, bcost = base.get(user, (0, 0))
        usual_n, usual_cost = bn * scale, bcost * scale
        reasons = []
        if n >= sp.min_requests and n > sp.factor * usual_n:
            reasons.append(f"{n} requests vs usual {usual_n:.1f} (alert above {sp.factor:g}x)")
        if min_nusd > 0 and cost >= min_nusd and cost > sp.factor * usual_cost:
            reasons.append(f"{dollars(cost)} vs usual {dollars(round(usual_cost))} (alert above {sp.factor:g}x)")
        if reasons:
            found.append(Spike(user, n, cost, usual_n, usual_cost, "; ".join(reasons)))
    return found
