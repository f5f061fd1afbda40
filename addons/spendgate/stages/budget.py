"""Stage: caps, checked before the request goes upstream.

The request's cost is estimated (prompt tokens counted with tiktoken, plus its own output
limit or the configured default) and reserved atomically against every cap that applies.
Settlement replaces the reservation by the actual cost when the request ends: `Record` writes
it in the same transaction as the request's audit completion.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from mitmproxy import http

from spendgate.money import MAX_NANO, Nano, to_nano, usd_text
from spendgate.pricing import Pricer
from spendgate.providers.tokens import estimate_input_tokens
from spendgate.providers.wire import EndpointKind, Usage
from spendgate.stages.call import OFF_LOOP_BYTES, Call, Hold, Outcome, get_call, refuse
from spendgate.store.budgets import BudgetDef, ReserveRequest, ReserveResult
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)

REMAINING_HEADER = "x-spendgate-budget-remaining-usd"
MAX_OUTPUT_TOKENS = 10_000_000


class Budgets:
    def __init__(
        self,
        budgets_for: Callable[[str, str | None], Sequence[BudgetDef]],
        reserve: Callable[[ReserveRequest], Awaitable[ReserveResult]],
        on_hold: Callable[[str], None],
        pricer: Pricer,
        default_max_output_tokens: int,
        reservation_ttl: timedelta,
        fail_closed: bool,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.budgets_for = budgets_for
        self.reserve = reserve
        self.on_hold = on_hold  # the maintenance loop keeps a live request's hold from expiring
        self.pricer = pricer
        self.default_max_output_tokens = default_max_output_tokens
        self.ttl = reservation_ttl
        self.fail_closed = fail_closed
        self.clock = clock

    async def estimate_nusd(self, call: Call) -> Nano:
        kind = call.endpoint_kind
        if kind is EndpointKind.OTHER or call.body is None:
            return Nano(0)
        family, body, model = call.provider.spec.family, call.body, call.model_requested
        if call.request_bytes > OFF_LOOP_BYTES:
            inp = await asyncio.to_thread(estimate_input_tokens, family, kind, body, model)
        else:
            inp = estimate_input_tokens(family, kind, body, model)
        out = 0 if kind is EndpointKind.EMBEDDINGS else (call.max_output_tokens or self.default_max_output_tokens)
        out = min(max(out, 0), MAX_OUTPUT_TOKENS)  # a negative or absurd limit must not shrink or overflow the estimate
        cost = self.pricer.cost(call.provider.name, model, Usage(input_tokens=inp, output_tokens=out))
        return min(to_nano(cost), MAX_NANO) if cost is not None else Nano(0)

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.key is None:
            return
        budgets = self.budgets_for(call.key.user, call.key.team)
        if not budgets:
            return
        amount = await self.estimate_nusd(call)
        now = self.clock()
        try:
            result = await self.reserve(ReserveRequest(call.request_id, tuple(budgets), amount, now, self.ttl))
        except Exception as e:
            log.error("budget reservation failed: %s", type(e).__name__)
            if self.fail_closed:
                refuse(flow, call, 503, "spendgate_store_unavailable",
                       "The gateway cannot check your budget right now, so the request was not sent. "
                       "Try again shortly.",
                       Outcome.GATEWAY_ERROR)
            return
        if result.blocked is not None:
            b = result.blocked
            retry_after = max(1, math.ceil((b.resets_at - now).total_seconds()))
            who = "global" if b.scope == "global" else f"{b.scope} {b.name}"
            spent = b.spent_nusd + b.reserved_nusd
            reached = ("reached" if spent >= b.cap_nusd
                       else f"would be passed by this request (estimated ${usd_text(amount, places=6)})")
            msg = (f"Spend cap for {who} {reached}: spent ${usd_text(spent, places=6)} of "
                   f"${usd_text(b.cap_nusd, places=6)} this {b.period}. The cap resets at {b.resets_at.isoformat()}.")
            refuse(flow, call, 429, "spendgate_budget_exceeded", msg, Outcome.BLOCKED_CAP,
                   headers={"retry-after": str(retry_after),
                            REMAINING_HEADER: usd_text(max(0, b.cap_nusd - spent), places=6)})
            call.blocked = b
            return
        call.hold = Hold(amount, result.refs, result.remaining_nusd)
        self.on_hold(call.request_id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None or call.hold is None or call.hold.remaining_nusd is None:
            return
        flow.response.headers[REMAINING_HEADER] = usd_text(max(0, call.hold.remaining_nusd), places=6)
