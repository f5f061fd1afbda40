"""The Record stage: the audit row is built in one place (`audit_row`), begun before the request
leaves, and finished as one writer item with the settlement and captured content."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState

from spendgate.providers import adapter_for
from spendgate.providers.base import StreamFormat
from spendgate.providers.stream import StreamTap
from spendgate.providers.wire import EndpointKind, Usage, UsageSource
from spendgate.stages.call import Hold, Outcome, client_gone
from spendgate.stages.record import Record, audit_row
from spendgate.store.audit import AuditRow
from spendgate.store.budgets import BudgetRef, ReserveRequest
from spendgate.store.models import utcnow
from spendgate.store.ratelimits import RateCheck, RateResult
from spendgate.store.writer import AuditUnavailable, Begun, Finished
from spendgate.testing import tcall, tflow, tkey, tresponse

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


class Writer:
    """Records what Record hands the audit writer; `fail` makes begin() raise like a dead store."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.begun: list[AuditRow] = []
        self.finished: list[Finished] = []

    async def begin(self, row: AuditRow, rate: RateCheck | None = None,
                    reserve: ReserveRequest | None = None) -> Begun:
        if self.fail:
            raise AuditUnavailable("OperationalError")
        self.begun.append(row)
        return Begun(None if rate is None else RateResult(True))

    def finish(self, item: Finished) -> None:
        self.finished.append(item)


def stage(writer: Writer, *, capture_all: bool = False, fail_closed: bool = True,
          released: list[str] | None = None) -> Record:
    return Record(writer, "gw-test:8080", capture_all, fail_closed, (released if released is not None else []).append)


def test_the_begin_row_holds_what_is_known_before_the_request_leaves() -> None:
    w = Writer()
    f = tflow(body=BODY, headers={"user-agent": "openai-python/3"})
    call = tcall(f, key=tkey(team="core"), body=BODY, client_addr="10.0.0.7", user_agent="openai-python/3")
    asyncio.run(stage(w).request(f))
    (row,) = w.begun
    assert (row.id, row.user, row.team, row.key_id) == (call.request_id, "alice", "core", "alice001")
    assert (row.provider, row.host, row.method, row.path, row.endpoint_kind) == (
        "openai", "api.openai.com", "POST", "/v1/chat/completions", "chat")
    assert (row.outcome, row.ended_at, row.model_requested) == ("incomplete", None, "gpt-4o")
    assert row.client_addr == "10.0.0.7"
    assert row.instance_id == "gw-test:8080" and call.audit.begun and not row.content_captured


def test_the_finished_item_carries_row_settlement_and_content_together() -> None:
    w, released = Writer(), []
    f = tflow(body=BODY)
    call = tcall(f, key=tkey(capture_reason="incident 42"), body=BODY)
    record = stage(w, released=released)
    asyncio.run(record.request(f))
    call.hold = Hold(estimate_nusd=5_000, refs=(BudgetRef(1, utcnow()),), remaining_nusd=100)
    f.response = tresponse(body={"id": "chatcmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    call.metering.usage = Usage(input_tokens=3, output_tokens=2, model_reported="gpt-4o-2024", upstream_request_id="c1")
    call.metering.source, call.metering.cost = UsageSource.PROVIDER, Decimal("0.0000275")
    record.finish(f, call)
    (item,) = w.finished
    assert item.begun and item.row is call.audit.row
    r = item.row
    assert (r.outcome, r.status_code, r.input_tokens, r.output_tokens, r.cost_nusd) == ("completed", 200, 3, 2, 27_500)
    assert (r.model_reported, r.upstream_request_id, r.usage_source) == ("gpt-4o-2024", "c1", "provider")
    assert item.settlement is not None and item.settlement.actual_nusd == 27_500
    assert item.settlement.refs == call.hold.refs and released == [call.request_id]
    assert item.content is not None and item.content.reason == "incident 42"
    assert item.content.response_body and "chatcmpl-1" in item.content.response_body
    assert r.content_captured and call.outcome is Outcome.COMPLETED


def test_a_refused_request_is_one_row_inserted_whole() -> None:
    w = Writer()
    f = tflow(body=BODY)
    call = tcall(f, body=BODY, outcome=Outcome.BLOCKED_CAP, status_code=429, error="spendgate_budget_exceeded")
    f.response = tresponse(429, b'{"error": {}}')
    stage(w).finish(f, call)
    (item,) = w.finished
    assert not item.begun and item.settlement is None and item.content is None
    assert (item.row.outcome, item.row.status_code, item.row.error) == ("blocked_cap", 429, "spendgate_budget_exceeded")
    assert item.row.response_bytes == len(b'{"error": {}}') and item.row.ended_at is not None


def test_cut_fields_accumulate_over_begin_and_completion() -> None:
    w = Writer()
    f = tflow(body=BODY)
    call = tcall(f, body=BODY, model_requested="m" * 500)
    record = stage(w)
    asyncio.run(record.request(f))
    assert w.begun[0].cut_fields == "model_requested" and len(w.begun[0].model_requested or "") == 200
    f.response = tresponse()
    call.metering.usage = Usage(model_reported="r\x00eported", upstream_request_id="x" * 300)
    record.finish(f, call)
    assert w.finished[0].row.cut_fields == "model_reported,model_requested,upstream_request_id"



def test_a_row_inserted_whole_at_the_end_is_fitted_whole() -> None:
    """A begun row's completion fits only the columns it writes; a row that was never begun is
    inserted whole at the end, so every column is fitted then."""
    w = Writer()
    f = tflow(body=BODY, resp=tresponse(429, b"{}"))
    call = tcall(f, body=BODY, model_requested="m" * 500, outcome=Outcome.BLOCKED_CAP, status_code=429)
    stage(w).finish(f, call)
    (item,) = w.finished
    assert not item.begun and len(item.row.model_requested or "") == 200 and item.row.cut_fields == "model_requested"

@pytest.mark.parametrize("fail_closed", [True, False])
def test_a_store_that_cannot_take_the_begin_row(fail_closed: bool) -> None:
    w = Writer(fail=True)
    f = tflow(body=BODY)
    call = tcall(f, body=BODY)
    record = stage(w, fail_closed=fail_closed)
    asyncio.run(record.request(f))
    if fail_closed:
        assert f.response is not None and f.response.status_code == 503
        assert call.outcome is Outcome.GATEWAY_ERROR
    else:
        assert f.response is None  # forwarded, and the row is written late, saying so
        f.response = tresponse()
        record.finish(f, call)
        (item,) = w.finished
        assert not item.begun and "audit row written late" in (item.row.error or "")


def _ended(*, response: bool, error: str | None, client_closed: bool = False, stream_completed: bool | None = None,
           status: int = 200) -> Any:
    f = tflow(body=BODY, resp=tresponse(status) if response else None)
    call = tcall(f, body=BODY)
    if stream_completed is not None:
        call.stream = True
        tap = call.metering.tap = StreamTap(adapter_for(call.provider.spec.family), EndpointKind.CHAT, StreamFormat.SSE)
        if stream_completed:
            tap.feed(b"data: [DONE]\n\n")
    if error is not None:
        f.error = mflow.Error(error)
    if client_closed:
        f.client_conn.state = ConnectionState.CLOSED
    return f, call


@pytest.mark.parametrize(("case", "want"), [
    (dict(response=False, error="Client disconnected."), ("client_aborted", None)),
    (dict(response=True, error="Client disconnected."), ("client_aborted", 200)),
    (dict(response=True, error="HTTP/2 protocol error: stream reset", client_closed=True), ("client_aborted", 200)),
    (dict(response=True, error="HTTP/1 protocol error: peer closed connection without sending complete message body"),
     ("upstream_error", 200)),
    (dict(response=False, error="[Errno 111] Connect call failed ('127.0.0.1', 1)"), ("upstream_error", 502)),
    (dict(response=False, error="Server connection timed out"), ("upstream_error", 504)),
    (dict(response=False, error="TLS handshake failed"), ("upstream_error", 502)),
    (dict(response=True, error=None, status=500), ("upstream_error", 500)),
    (dict(response=True, error=None), ("completed", 200)),
    (dict(response=True, error=None, stream_completed=False), ("upstream_error", 200)),
    (dict(response=True, error="Client disconnected.", stream_completed=True), ("completed", 200)),
    (dict(response=True, error="upstream went idle", stream_completed=False), ("upstream_error", 200)),
], ids=["client-gone-before-answer", "client-gone-mid-answer", "client-conn-closed", "upstream-cut-answer",
        "connect-refused", "connect-timeout", "tls-failure", "upstream-5xx", "completed", "stream-without-its-end",
        "client-left-after-the-last-event", "stream-cut"])
def test_how_a_request_ended(case: dict[str, Any], want: tuple[str, int | None]) -> None:
    f, call = _ended(**case)
    row = audit_row(f, call, "gw", ended=True)
    assert (row.outcome, row.status_code) == want
    if case.get("error") and case.get("stream_completed") is None:
        assert client_gone(f) == (want[0] == "client_aborted")
    if want[0] == "upstream_error" and case.get("stream_completed") is False:
        assert "stream ended before its final event" in (row.error or "")
