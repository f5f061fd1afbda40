"""Stage: caps, checked before the request goes upstream.

The request's cost is estimated (prompt tokens counted with tiktoken, plus its own output
limit or the configured default) and reserved atomically against every cap that applies.
Settlement replaces the reservation by the actual cost when the request ends (see record.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Callable

from mitmproxy import http

from spendgate.call import OFF_LOOP_BYTES, Call, get_call, refuse
from spendgate.meter import nano_usd
from spendgate.models import utcnow
from spendgate.runtime import Runtime
from spendgate.store import ReserveRequest
from spendgate.tokens import estimate_input_tokens
from spendgate.usage import EndpointKind, Family, Usage

log = logging.getLogger("spendgate.budget")

REMAINING_HEADER = "x-spendgate-budget-remaining-usd"
MAX_OUTPUT_TOKENS = 10_000_000
MAX_AMOUNT_NUSD = 2**62  # fits BIGINT with room for sums; any real cap is far below


def usd_text(nano: int) -> str:
    """Nano-USD as a plain decimal string for headers and messages.

    >>> usd_text(1_234_500_000)
    '1.2345'
    """
    d = (Decimal(nano) / Decimal(1_000_000_000)).quantize(Decimal("0.000001"))
    return format(d.normalize(), "f")


class Budgets:
    def __init__(self, rt: Runtime, clock: Callable[[], datetime] = utcnow) -> None:
        self.rt = rt
        self.clock = clock

    async def estimate_nusd(self, call: Call) -> int:
        kind = EndpointKind(call.endpoint_kind)
        if kind is EndpointKind.OTHER or call.body is None:
            return 0
        family = Family(call.family)
        body, model = call.body, call.model_requested
        if call.request_bytes > OFF_LOOP_BYTES:
            inp = await asyncio.to_thread(estimate_input_tokens, family, kind, body, model)
        else:
            inp = estimate_input_tokens(family, kind, body, model)
        out = 0 if kind is EndpointKind.EMBEDDINGS else (call.max_output_tokens or self.rt.settings.default_max_output_tokens)
        out = min(max(out, 0), MAX_OUTPUT_TOKENS)  # a negative or absurd limit must not shrink or overflow the estimate
        cost = self.rt.pricer.cost(call.provider.name, model, Usage(input_tokens=inp, output_tokens=out))
        call.extra["estimate_tokens"] = (inp, out)
        return min(nano_usd(cost) or 0, MAX_AMOUNT_NUSD)

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.key is None:
            return
        budgets = self.rt.registry.budgets_for(call.key.user, call.key.team)
        if not budgets:
            return
        amount = await self.estimate_nusd(call)
        now = self.clock()
        ttl = timedelta(seconds=self.rt.settings.reservation_ttl_seconds)
        try:
            result = await self.rt.writer.reserve(ReserveRequest(call.request_id, tuple(budgets), amount, now, ttl))
        except Exception as e:
            log.error("budget reservation failed: %s", type(e).__name__)
            if self.rt.settings.fail_closed:
                refuse(flow, call, 503, "spendgate_store_unavailable",
                       "The gateway cannot check your budget right now, so the request was not sent. Try again shortly.",
                       "gateway_error")
            return
        call.extra["estimate_nusd"] = amount
        if result.blocked is not None:
            b = result.blocked
            retry_after = max(1, math.ceil((b.resets_at - now).total_seconds()))
            who = "global" if b.scope == "global" else f"{b.scope} {b.name}"
            spent = b.spent_nusd + b.reserved_nusd
            reached = "reached" if spent >= b.cap_nusd else f"would be passed by this request (estimated ${usd_text(amount)})"
            msg = (f"Spend cap for {who} {reached}: spent ${usd_text(spent)} of ${usd_text(b.cap_nusd)} this {b.period}."
                   f" The cap resets at {b.resets_at.isoformat()}.")
            refuse(flow, call, 429, "spendgate_budget_exceeded", msg, "blocked_cap",
                   headers={"retry-after": str(retry_after), REMAINING_HEADER: usd_text(max(0, b.cap_nusd - spent))})
            call.extra["blocked_budget"] = b
            return
        call.extra["reservation"] = result.refs
        self.rt.holds.add(call.request_id)
        if result.remaining_nusd is not None:
            call.extra["budget_remaining_nusd"] = result.remaining_nusd

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None:
            return
        remaining = call.extra.get("budget_remaining_nusd")
        if remaining is not None:
            flow.response.headers[REMAINING_HEADER] = usd_text(max(0, remaining))
