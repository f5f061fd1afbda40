"""Stage: the audit record. The row is committed before the request goes upstream, with the key's
rate count and the caps' reservation (`call.ask`) in the same commit, and completed
when it ends, in one writer item with the budget settlement and any captured content; refusals
get a row too. Content only for keys with capture on.

`audit_row` is the one place an audit row's fields are set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mitmproxy import http

from spendgate.money import to_nano
from spendgate.stages.call import Call, Capture, Outcome, client_gone, get_call, refuse
from spendgate.store.audit import COMPLETION, AuditRow, ContentRow
from spendgate.store.budgets import Settlement
from spendgate.store.models import AuditRecord, utcnow
from spendgate.store.ratelimits import RateCheck
from spendgate.store.rowfit import RowFitter
from spendgate.store.writer import AuditUnavailable, AuditWriter, Finished

log = logging.getLogger(__name__)

CAPTURE_LIMIT = 4 * 1024 * 1024
_FIT = RowFitter(AuditRecord.__table__)  # type: ignore[attr-defined]


def audit_row(flow: http.HTTPFlow, call: Call, instance_id: str, ended: bool) -> AuditRow:
    """The request's audit row as far as it is known: at begin (`ended=False`) or at the end."""
    key = call.key
    row = AuditRow(
        id=call.request_id, started_at=call.started_at, provider=call.provider.name, host=call.host,
        method=flow.request.method, path=flow.request.path.split("?", 1)[0], endpoint_kind=call.endpoint_kind,
        outcome=Outcome.INCOMPLETE, user=key.user if key else None, team=key.team if key else None,
        key_id=key.key_id if key else None, model_requested=call.model_requested, stream=call.stream,
        request_bytes=call.request_bytes, client_addr=call.client_addr, user_agent=call.user_agent or None,
        content_captured=call.capture is not None, instance_id=instance_id,
    )
    if not ended:
        return row
    row.ended_at = utcnow()
    row.latency_ms = round((time.perf_counter() - call.timing.t0) * 1000, 3)
    outcome, status, error = _outcome(flow, call)
    row.outcome, row.status_code, row.error = outcome, status, error
    m = call.metering
    row.response_bytes = m.response_bytes if call.outcome is None else (
        len(flow.response.raw_content or b"") if flow.response else 0)
    if call.outcome is None and call.stream and call.timing.first_chunk is not None:
        row.ttft_ms = round((call.timing.first_chunk - call.timing.t0) * 1000, 3)
    if m.usage is not None:
        u = m.usage
        row.input_tokens, row.output_tokens = u.input_tokens, u.output_tokens
        row.cache_read_tokens, row.cache_write_tokens, row.reasoning_tokens = (
            u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens)
        row.model_reported, row.upstream_request_id = u.model_reported, u.upstream_request_id
        row.usage_source = m.source
        row.cost_nusd = to_nano(m.cost) if m.cost is not None else None
    if m.cost_source is not None:
        row.cost_source = m.cost_source
    if call.audit.begin_failed:
        row.error = f"{row.error or ''} (audit row written late: {call.audit.begin_failed})".strip()
    return row


def _outcome(flow: http.HTTPFlow, call: Call) -> tuple[Outcome, int | None, str | None]:
    """How the request ended: the refusal a stage made, else what the upstream and the client did."""
    if call.outcome is not None:
        return call.outcome, call.status_code, call.error
    tap = call.metering.tap
    resp = flow.response
    if tap is not None and tap.completed and resp is not None and resp.status_code < 400:
        # The stream's last event went through; a client that hangs up after it still got (and owes) it all.
        return Outcome.COMPLETED, resp.status_code, None
    if flow.error is not None:
        gone = client_gone(flow)
        if resp is not None and tap is not None and not tap.completed and not gone and resp.status_code < 400:
            return (Outcome.UPSTREAM_ERROR, resp.status_code,
                    f"stream ended before its final event (usage estimated): {flow.error.msg}"[:2000])
        if gone:
            return Outcome.CLIENT_ABORTED, resp.status_code if resp else None, flow.error.msg[:500]
        if resp is not None:
            return Outcome.UPSTREAM_ERROR, resp.status_code, flow.error.msg[:500]
        timed_out = "timed out" in flow.error.msg.lower() or "timeout" in flow.error.msg.lower()
        return Outcome.UPSTREAM_ERROR, 504 if timed_out else 502, flow.error.msg[:500]
    assert resp is not None
    if resp.status_code >= 400:
        return Outcome.UPSTREAM_ERROR, resp.status_code, f"upstream answered {resp.status_code}"
    if tap is not None and not tap.completed:
        return Outcome.UPSTREAM_ERROR, resp.status_code, "stream ended before its final event (usage estimated)"
    return Outcome.COMPLETED, resp.status_code, None


class Record:
    def __init__(self, writer: AuditWriter, instance_id: str, capture_all: bool, fail_closed: bool,
                 release_hold: Callable[[str], None]) -> None:
        self.writer = writer
        self.instance_id = instance_id
        self.capture_all = capture_all  # [audit] capture_content
        self.fail_closed = fail_closed
        self.release_hold = release_hold

    def _capture_reason(self, call: Call) -> str | None:
        if call.key is not None and call.key.capture_content:
            return call.key.capture_reason or "key capture on"
        if self.capture_all:
            return "audit.capture_content = true (global)"
        return None

    def _fit(self, call: Call, row: AuditRow, names: tuple[str, ...] | None = None) -> AuditRow:
        """Cut the row's columns `names` (default: all) to fit; `cut_fields` accumulates over the begin
        row and its completion."""
        cut = _FIT.fit(row, names)
        if cut:
            call.audit.cut |= cut
        if call.audit.cut:
            row.cut_fields = ",".join(sorted(call.audit.cut))[:200]
        return row

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        reason = self._capture_reason(call)
        if reason is not None:
            call.capture = Capture(reason)
        key = call.key
        rate = RateCheck(key.key_id, key.rpm, utcnow()) if key is not None and key.rpm else None
        ask = call.ask
        try:
            begun = await self.writer.begin(self._fit(call, audit_row(flow, call, self.instance_id, ended=False)),
                                            rate, ask.request if ask is not None else None)
        except AuditUnavailable as e:
            call.audit.begin_failed = str(e)
            if self.fail_closed:
                refuse(flow, call, 503, "spendgate_store_unavailable",
                       "The gateway cannot write its audit log right now, so the request was not sent. "
                       "Try again shortly.",
                       Outcome.GATEWAY_ERROR)
                return
            log.error("audit row not committed (%s); forwarding because budgets.fail_closed = false", e)
            return
        call.audit.begun = True
        if ask is not None:
            ask.result = begun.reserved  # `BudgetAdmission` admits or refuses on it
        counted = begun.rate
        if counted is not None and not counted.allowed and key is not None:
            # Counted in the store every instance shares: the limit holds for the key in total.
            refuse(flow, call, 429, "spendgate_rate_limited",
                   f"Rate limit: key {key.key_id} allows {key.rpm} requests per minute (across every gateway "
                   f"instance). Retry in {counted.retry_after} s.",
                   Outcome.BLOCKED_RATE, headers={"retry-after": str(counted.retry_after)})

    def finish(self, flow: http.HTTPFlow, call: Call) -> None:
        # A row that was begun is completed with COMPLETION columns only; its others were fitted then.
        row = self._fit(call, audit_row(flow, call, self.instance_id, ended=True),
                        COMPLETION if call.audit.begun else None)
        call.outcome, call.status_code = Outcome(row.outcome), row.status_code
        call.audit.row = row
        settlement = None
        if call.hold is not None:
            self.release_hold(call.request_id)
            # A request that never reached the provider costs nothing; an unknown price counts as 0.
            settlement = Settlement(call.request_id, call.hold.refs, row.cost_nusd or 0)
        content = None
        if call.audit.begun and call.capture is not None:
            captured = call.capture.response
            if call.metering.tap is None and flow.response is not None:
                captured.extend((flow.response.get_content(strict=False) or b"")[:CAPTURE_LIMIT])
            content = ContentRow(call.request_id, row.ended_at or utcnow(), call.key.key_id if call.key else None,
                                 call.capture.reason, _text(flow.request.get_content(strict=False)),
                                 _text(bytes(captured)))
        self.writer.finish(Finished(row, call.audit.begun, settlement, content))


def _text(content: bytes | None) -> str | None:
    return None if content is None else content.decode("utf-8", "replace")
