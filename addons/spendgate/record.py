"""Stage: the audit record. The row is committed before the request goes upstream and
completed when it ends; refusals get a row too. Content only for keys with capture on."""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import http

from spendgate.auditlog import AuditUnavailable, AuditWriter
from spendgate.call import Call, get_call, refuse
from spendgate.meter import body_text, nano_usd
from spendgate.outcome import classify_error, client_gone
from spendgate.models import AuditRecord, utcnow
from spendgate.rowfit import RowFitter
from spendgate.runtime import Runtime
from spendgate.usage import Usage

log = logging.getLogger("spendgate.record")


class Record:
    def __init__(self, rt: Runtime, writer: AuditWriter) -> None:
        self.rt = rt
        self.writer = writer
        self.fitter = RowFitter(AuditRecord.__table__)  # type: ignore[attr-defined]

    def _fit(self, call: Call, row: dict[str, Any]) -> dict[str, Any]:
        """Cut the row to its columns; `cut_fields` accumulates over the begin row and its completion."""
        self.fitter.fit(row)
        if "cut_fields" in row:
            cut = set(call.extra.get("cut_fields", ())) | set(row["cut_fields"].split(","))
            call.extra["cut_fields"] = cut
            row["cut_fields"] = ",".join(sorted(cut))[:200]
        return row

    def _capture_reason(self, call: Call) -> str | None:
        if call.key is not None and call.key.capture_content:
            return call.key.capture_reason or "key capture on"
        if self.rt.settings.capture_content:
            return "audit.capture_content = true (global)"
        return None

    def _base_row(self, flow: http.HTTPFlow, call: Call) -> dict[str, Any]:
        key = call.key
        return {
            "id": call.request_id,
            "started_at": call.started_at,
            "user": key.user if key else None,
            "team": key.team if key else None,
            "key_id": key.key_id if key else None,
            "provider": call.provider.name,
            "host": call.host,
            "method": flow.request.method,
            "path": flow.request.path.split("?", 1)[0],
            "endpoint_kind": call.endpoint_kind,
            "model_requested": call.model_requested,
            "stream": call.stream,
            "request_bytes": call.request_bytes,
            "client_addr": call.extra.get("client_addr"),
            "user_agent": call.extra.get("user_agent") or None,
            "instance_id": self.rt.instance_id,
        }

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        row = self._base_row(flow, call)
        row["outcome"] = "incomplete"
        reason = self._capture_reason(call)
        if reason is not None:
            call.extra["capture"] = bytearray()
            call.extra["capture_reason"] = reason
            row["content_captured"] = True
        try:
            await self.writer.begin(self._fit(call, row))
        except AuditUnavailable as e:
            if self.rt.settings.fail_closed:
                refuse(flow, call, 503, "spendgate_store_unavailable",
                       "The gateway cannot write its audit log right now, so the request was not sent. Try again shortly.",
                       "gateway_error")
                call.extra["begin_failed"] = str(e)
                return
            log.error("audit row not committed (%s); forwarding because budgets.fail_closed = false", e)
            call.extra["begin_failed"] = str(e)
            return
        call.extra["begun"] = True
        if "t_req0" in call.extra:
            call.extra["t_pre"] = call.extra.get("t_pre", 0.0) + time.perf_counter() - call.extra["t_req0"]

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or call.extra.get("finished"):
            return
        call.extra["finished"] = True
        end = utcnow()
        fields: dict[str, Any] = {"ended_at": end, "latency_ms": round((time.perf_counter() - call.t0) * 1000, 3)}
        if call.outcome is not None:  # refused by a stage
            fields.update(outcome=call.outcome, status_code=call.status_code, error=call.error,
                          response_bytes=len(flow.response.raw_content or b"") if flow.response else 0)
        else:
            outcome, status, error = self._outcome(flow, call)
            call.outcome, call.status_code = outcome, status
            fields.update(outcome=outcome, status_code=status, error=error,
                          response_bytes=call.extra.get("response_bytes", 0))
            t_first = call.extra.get("t_first")
            if t_first is not None and call.stream:
                fields["ttft_ms"] = round((t_first - call.t0) * 1000, 3)
        usage: Usage | None = call.extra.get("usage")
        if usage is not None:
            fields.update(
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
                reasoning_tokens=usage.reasoning_tokens, usage_source=call.extra.get("usage_source"),
                model_reported=usage.model_reported, upstream_request_id=usage.upstream_request_id,
                cost_nusd=nano_usd(call.extra.get("cost")),
            )
        refs = call.extra.get("reservation")
        if refs is not None:
            self.rt.holds.discard(call.request_id)
            # Settle in the same transaction as the completion; a request that never reached the
            # provider costs nothing (cost None with tokens: unknown price, counted as 0 against caps).
            self.writer.settle({"request_id": call.request_id, "refs": refs,
                                "actual_nusd": fields.get("cost_nusd") or 0})
        if call.extra.get("begun"):
            self.writer.update(self._fit(call, {"id": call.request_id, **fields}))
        else:
            row = self._base_row(flow, call)
            row.update(fields)
            if call.extra.get("begin_failed"):
                row["error"] = f"{row.get('error') or ''} (audit row written late: {call.extra['begin_failed']})".strip()
            self.writer.insert(self._fit(call, row))
        call.extra["final"] = fields
        capture = call.extra.get("capture")
        if call.extra.get("begun") and capture is not None:
            if call.extra.get("tap") is None and flow.response is not None:
                capture.extend((flow.response.get_content(strict=False) or b"")[: 4 * 1024 * 1024])
            self.writer.content({
                "request_id": call.request_id, "captured_at": end, "key_id": call.key.key_id if call.key else None,
                "reason": call.extra.get("capture_reason") or "",
                "request_body": body_text(flow.request.get_content(strict=False)),
                "response_body": body_text(bytes(capture)),
            })
        if "t_resp0" in call.extra:
            call.extra["t_post"] = time.perf_counter() - call.extra["t_resp0"]
        alerts = getattr(self.rt, "alerts", None)
        if alerts is not None:
            alerts.observe(call)  # an in-memory append; cap blocks and raw provider keys feed Slack alerts

    @staticmethod
    def _outcome(flow: http.HTTPFlow, call: Call) -> tuple[str, int | None, str | None]:
        tap = call.extra.get("tap")
        if tap is not None and tap.completed and flow.response is not None and flow.response.status_code < 400:
            # The stream's last event went through; a client that hangs up after it still got (and owes) it all.
            return "completed", flow.response.status_code, None
        cut_by_upstream = (flow.error is not None and flow.response is not None and tap is not None
                           and not tap.completed and not client_gone(flow) and flow.response.status_code < 400)
        if cut_by_upstream:
            assert flow.response is not None and flow.error is not None
            return ("upstream_error", flow.response.status_code,
                    f"stream ended before its final event (usage estimated): {flow.error.msg}")
        if flow.error is not None:
            outcome, status = classify_error(flow)
            return outcome, status, flow.error.msg[:500]
        assert flow.response is not None
        status = flow.response.status_code
        if status >= 400:
            return "upstream_error", status, f"upstream answered {status}"
        tap = call.extra.get("tap")
        if tap is not None and not tap.completed:
            return "upstream_error", status, "stream ended before its final event (usage estimated)"
        return "completed", status, None
