"""Stage: caps, checked before the request goes upstream.

For a caller under a cap, the request's cost is estimated (`Estimator`: the prompt, and every
answer it asks for) and reserved atomically against every cap that applies. The stage works in
two halves around `Record`: `Budgets.request` decides the amount (`call.ask`), `Record` takes it
in the commit of the request's write-ahead audit row, and `BudgetAdmission` admits, lowers the
output limit or refuses. What cannot be
estimated is refused: a model without a price (unless `[prices] unknown_model = "fallback"`) and
endpoints the gateway cannot price up front (unless named in `[budgets] allow_unmetered`).

When the full output limit does not fit, the limit is lowered to what is left (`clamp_output`):
the reservation is what was sent, so the cap still holds exactly. Settlement replaces the
reservation by the actual cost when the request ends (`Record`, one transaction with the row).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mitmproxy import http

from spendgate.money import MAX_NANO, Nano, to_nano, usd_text
from spendgate.pricing import CostSource, Pricer, price_line
from spendgate.providers import adapter_for
from spendgate.providers.wire import Usage
from spendgate.stages.call import Call, CapAsk, Hold, Outcome, get_call, refuse
from spendgate.stages.estimate import Estimator, clampable
from spendgate.store.budgets import Blocked, BudgetDef, ReserveRequest, ReserveResult
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)

REMAINING_HEADER = "x-spendgate-budget-remaining-usd"
LIMITED_HEADER = "x-spendgate-output-limited"
_CLAMP_TRIES = 3  # another cap, or a concurrent request, may block the lowered estimate too
_BOUND_SHARE = 100  # a request whose upper bound is at most 1 % of every cap it counts against is not counted


@dataclass(frozen=True)
class CapRules:
    """`[budgets]` and `[prices]` as this stage reads them."""

    reservation_ttl: timedelta
    fail_closed: bool
    clamp_output: bool = True
    min_output_tokens: int = 256
    allow_unmetered: frozenset[str] = frozenset()


class Budgets:
    def __init__(
        self,
        budgets_for: Callable[[str, str | None], Sequence[BudgetDef]],
        reserve: Callable[[ReserveRequest], Awaitable[ReserveResult]],
        on_hold: Callable[[str], None],
        pricer: Pricer,
        estimator: Estimator,
        rules: CapRules,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.budgets_for = budgets_for
        self.reserve = reserve
        self.on_hold = on_hold  # the maintenance loop keeps a live request's hold from expiring
        self.pricer = pricer
        self.estimator = estimator
        self.rules = rules
        self.clock = clock

    def _nusd(self, call: Call, usage: Usage) -> Nano:
        cost = self.pricer.price(call.provider.name, call.model_requested, usage=usage).cost
        return min(to_nano(cost), MAX_NANO) if cost is not None else Nano(0)

    async def estimate_nusd(self, call: Call) -> Nano:
        return self._nusd(call, await self.estimator.usage(call))

    async def request(self, flow: http.HTTPFlow) -> None:
        """Decide what to hold (`call.ask`); `Record` takes it with the audit row, `admit` reads the result."""
        call = get_call(flow)
        if call is None or flow.response is not None or call.key is None:
            return
        budgets = tuple(self.budgets_for(call.key.user, call.key.team))
        if not budgets:
            return  # no cap: served whatever it costs, and recorded
        if self._refused_unmeasurable(flow, call):
            return
        now = self.clock()
        if not call.endpoint_kind.metered or call.upgrade:
            # Nothing to price (a listing, a file, a WebSocket upgrade): only whether a cap is reached.
            call.ask = CapAsk(self._ask(call, budgets, Nano(0), now), None, priced=False)
            return
        bound = self.estimator.bound(call)
        amount = self._nusd(call, bound) if bound is not None else Nano(MAX_NANO)
        if amount * _BOUND_SHARE <= min(b.cap_nusd for b in budgets):
            # A small request against its caps: an upper bound is held without counting a token,
            # and settlement replaces it by the actual cost. If even that does not fit, or the
            # request is large next to a cap, it is counted exactly (and its output limit lowered).
            call.ask = CapAsk(self._ask(call, budgets, amount, now), None)
            return
        usage = await self.estimator.usage(call)
        call.ask = CapAsk(self._ask(call, budgets, self._nusd(call, usage), now), usage)

    def _ask(self, call: Call, budgets: tuple[BudgetDef, ...], amount: Nano, now: datetime) -> ReserveRequest:
        return ReserveRequest(call.request_id, budgets, amount, now, self.rules.reservation_ttl)

    async def admit(self, flow: http.HTTPFlow) -> None:
        """The ask's result: hold it, or count exactly, lower the output limit or refuse."""
        call = get_call(flow)
        if call is None or flow.response is not None or call.ask is None:
            return
        ask = call.ask
        result = ask.result or await self._reserve(flow, call, ask.request)  # none if Record did not take it
        if result is None:
            return
        if not ask.priced:
            if result.blocked is not None:
                self._refuse_cap(flow, call, result.blocked, Nano(0), ask.request.now)
            else:
                self._hold(call, Nano(0), result)
            return
        if ask.counted is None:
            if result.blocked is None:
                self._send_what_is_held(call, None)
                self._hold(call, Nano(ask.request.amount_nusd), result)
                return
            usage = await self.estimator.usage(call)  # the bound did not fit: count exactly
            result = await self._reserve(flow, call, replace(ask.request, amount_nusd=self._nusd(call, usage)))
            if result is None:
                return
        else:
            usage = ask.counted
        amount = self._nusd(call, usage)
        limited: int | None = None
        tries = 0
        while result.blocked is not None and self.rules.clamp_output and clampable(call) and tries < _CLAMP_TRIES:
            tries += 1
            fit = self._affordable(call, usage, result.blocked)
            if fit is None or fit < self.rules.min_output_tokens:
                break
            usage = self.estimator.with_output(usage, fit, call.choices)
            amount = self._nusd(call, usage)
            result = await self._reserve(flow, call, replace(ask.request, amount_nusd=amount))
            if result is None:
                return
            limited = fit
        if result.blocked is not None:
            self._refuse_cap(flow, call, result.blocked, amount, ask.request.now)
            return
        self._send_what_is_held(call, limited)
        self._hold(call, amount, result)

    def _hold(self, call: Call, amount: Nano, result: ReserveResult) -> None:
        call.hold = Hold(amount, result.refs, result.remaining_nusd)
        self.on_hold(call.request_id)

    def _send_what_is_held(self, call: Call, limited: int | None) -> None:
        """The output limit sent is the one held: the lowered one, or, for a request that set none
        (or a negative one), the default it was held at. Without it the provider may write up
        to the model's own maximum, and N such requests in flight pass the cap by N times that."""
        if not (self.rules.clamp_output and clampable(call)) or call.body is None:
            return
        if limited is None:
            if call.max_output_tokens is not None and call.max_output_tokens >= 0:
                return
            limited = self.estimator.output_per_choice(call)
            if limited <= 0:
                return
        adapter_for(call.provider.spec.family).set_output_limit(
            call.endpoint_kind, call.body, limited, call.provider.spec.chat_limit_field)
        call.body_changed = True
        call.max_output_tokens = call.output_limited = limited

    def _refused_unmeasurable(self, flow: http.HTTPFlow, call: Call) -> bool:
        """Refuse, for a caller under a cap, what the gateway cannot estimate: fail closed."""
        if call.unmetered is not None and call.unmetered not in self.rules.allow_unmetered:
            refuse(flow, call, 403, "spendgate_unmetered_endpoint",
                   f"The gateway cannot price {call.unmetered} requests ({flow.request.method} "
                   f"{flow.request.path.split('?', 1)[0][:200]}) before they are sent, so they are refused for keys "
                   f"under a spend cap. An admin can allow them with [budgets] allow_unmetered = "
                   f'["{call.unmetered}"] (their cost is then not capped).',
                   Outcome.BLOCKED_POLICY)
            return True
        if not call.endpoint_kind.metered or call.upgrade:
            return False  # a WebSocket upgrade: each of its model calls is checked as it is sent
        source = self.pricer.source(call.provider.name, call.model_requested)
        if source is CostSource.UNKNOWN:
            model = call.model_requested
            named = repr(model[:200]) if model else "(no model named)"
            line = price_line(call.provider.name, model[:200] if model else "MODEL")
            refuse(flow, call, 403, "spendgate_unpriced_model",
                   f"No price is known for {call.provider.name} model {named}, so its cost cannot be held against "
                   f"your spend cap and the request was not sent. Ask your admin to add its price (USD per million "
                   f"tokens) to the gateway config under [prices.overrides]: {line}, or to set "
                   f'[prices] unknown_model = "fallback".',
                   Outcome.BLOCKED_POLICY)
            call.metering.cost_source = CostSource.UNKNOWN
            return True
        return False

    async def _reserve(self, flow: http.HTTPFlow, call: Call, request: ReserveRequest) -> ReserveResult | None:
        try:
            return await self.reserve(request)
        except Exception as e:
            log.error("budget reservation failed: %s", type(e).__name__)
            if self.rules.fail_closed:
                refuse(flow, call, 503, "spendgate_store_unavailable",
                       "The gateway cannot check your budget right now, so the request was not sent. "
                       "Try again shortly.",
                       Outcome.GATEWAY_ERROR)
            return None

    def _affordable(self, call: Call, usage: Usage, cap: Blocked) -> int | None:
        """Output tokens per answer the cap's headroom pays for, beside the prompt; None: none do."""
        left = cap.cap_nusd - cap.spent_nusd - cap.reserved_nusd
        base = self._nusd(call, self.estimator.with_output(usage, 0, call.choices))
        asked = self.estimator.output_per_choice(call)
        if left <= base or asked <= 0:
            return None
        full = self._nusd(call, usage)
        per_token = (full - base) / (asked * call.choices)
        if per_token <= 0:
            return None
        fit = min(asked - 1, math.floor((left - base) / (per_token * call.choices)))
        # Tiered prices are not linear: step down until the estimate really fits.
        while fit > 0 and self._nusd(call, self.estimator.with_output(usage, fit, call.choices)) > left:
            fit = math.floor(fit * 0.98)
        return fit if fit > 0 else None

    def _refuse_cap(self, flow: http.HTTPFlow, call: Call, b: Blocked, amount: Nano, now: datetime) -> None:
        retry_after = max(1, math.ceil((b.resets_at - now).total_seconds()))
        who = "global" if b.scope == "global" else f"{b.scope} {b.name}"
        spent = b.spent_nusd + b.reserved_nusd
        reached = ("reached" if spent >= b.cap_nusd
                   else f"would be passed by this request (estimated ${usd_text(amount, places=6)})")
        fewer = ""
        if self.rules.clamp_output and clampable(call):
            fewer = f" Not even {self.rules.min_output_tokens} output tokens fit in what is left ([budgets] " \
                    "min_output_tokens)."
        msg = (f"Spend cap for {who} {reached}: spent ${usd_text(spent, places=6)} of "
               f"${usd_text(b.cap_nusd, places=6)} this {b.period}.{fewer} "
               f"The cap resets at {b.resets_at.isoformat()}.")
        refuse(flow, call, 429, "spendgate_budget_exceeded", msg, Outcome.BLOCKED_CAP,
               headers={"retry-after": str(retry_after),
                        REMAINING_HEADER: usd_text(max(0, b.cap_nusd - spent), places=6)})
        call.blocked = b

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Tell the caller what is left under their tightest cap, and that the output limit was lowered."""
        call = get_call(flow)
        if call is None or flow.response is None or call.hold is None:
            return
        if call.hold.remaining_nusd is not None:
            flow.response.headers[REMAINING_HEADER] = usd_text(max(0, call.hold.remaining_nusd), places=6)
        if call.output_limited is not None:
            flow.response.headers[LIMITED_HEADER] = str(call.output_limited)


class BudgetAdmission:
    """The second half of the caps stage, after `Record` took the ask with the audit row."""

    def __init__(self, budgets: Budgets) -> None:
        self.request = budgets.admit
