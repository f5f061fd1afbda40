"""Dodging a spend cap over a WebSocket (issue 12), against a real ``spendgate serve`` (``gw_caps``)
and the mock's Responses / Realtime sockets: calls on models without a price, messages the
gateway cannot read (not JSON, a byte-order mark, repeated keys, binary frames), calls sent
back to back without waiting, a cap set while the socket is open, and calls whose cost the
provider bills without a client message the gateway could hold it against.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.rig.gateway import GatewayProcess
from tests.rig.leaks import SecretScan
from tests.rig.ledger import Ledger, usd
from tests.rig.mock_provider import MockProvider
from tests.rig.mock_ws import RecordedWsSession
from tests.rig.wsclient import OPENAI_WSS, REALTIME_END, RESPONSES_END, drain_until_closed, error_code, until, ws_open

CODEX = "gpt-5.1-codex"  # genai-prices: $1.25 / $10 per 1M tokens
CODEX_OUT = Decimal(10) / 1_000_000
UNPRICED = "gpt-9-omega"
RESPONSES_URL = f"{OPENAI_WSS}/v1/responses"
REALTIME_URL = f"{OPENAI_WSS}/v1/realtime?model=gpt-realtime"


@pytest.fixture(scope="module")
def lg(gw_caps: GatewayProcess) -> Iterator[Ledger]:
    ledger = Ledger.of(gw_caps)
    yield ledger
    ledger.close()


_seq = itertools.count(1)


def mint(lg: Ledger, scan: SecretScan, name: str, cap: str | None = "1.00") -> tuple[str, str]:
    """(user, key) for a user of this test alone, the key known to the secret scan."""
    user = f"ws-{name}-{next(_seq)}"
    key = str(lg.key(user, cap=cap)["key"])
    scan.add_key(f"gateway key of {user}@sec-caps", key)
    return user, key


def create(model: str | None, text: str = "Say hi.", **extra: Any) -> str:
    return json.dumps({"type": "response.create", **({"model": model} if model else {}), "input": text, **extra})


def creates_seen(sess: RecordedWsSession) -> list[dict[str, Any]]:
    return [m for m in sess.received() if isinstance(m, dict) and m.get("type") == "response.create"]


def refusal(ws: Any, timeout: float = 5.0) -> str | None:
    """The code of the error event that answers the last message (None: the socket closed first)."""
    try:
        return error_code(until(ws, *RESPONSES_END, timeout=timeout)[-1])
    except ConnectionClosed:
        return None


# --------------------------------------------------------------------------- models without a price


def test_a_model_without_a_price_is_refused_call_by_call(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                        mock_provider: MockProvider) -> None:
    user, key = mint(lg, scan, "unpriced")
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        ws.send(create(UNPRICED))
        assert refusal(ws) == "spendgate_unpriced_model"
        ws.send(create(None))  # no model named: nothing to price either
        assert refusal(ws) == "spendgate_unpriced_model"
        ws.send(create(CODEX))  # the socket stays usable for what has a price
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [m.get("model") for m in creates_seen(sess)] == [CODEX]
    rows = lg.settled(user, 4)  # the upgrade, two refusals, one call
    assert sorted(r["outcome"] for r in rows if r["method"] != "GET") == ["blocked_policy", "blocked_policy",
                                                                          "completed"]


def test_a_realtime_session_switched_to_a_model_without_a_price_is_refused(gw_caps: GatewayProcess, lg: Ledger,
                                                                           scan: SecretScan,
                                                                           mock_provider: MockProvider) -> None:
    _, key = mint(lg, scan, "realtime-unpriced")
    with ws_open(gw_caps, REALTIME_URL, key) as ws:
        until(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "model": UNPRICED}}))
        ws.send(json.dumps({"type": "response.create", "event_id": "evt_1"}))
        events = until(ws, "error", timeout=5)
    assert error_code(events[-1]) == "spendgate_unpriced_model", events
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert sess.calls == []


# --------------------------------------------------------------------------- messages the gateway cannot read

INVALID = {
    "not-json": "response.create please",
    "trailing-data": create(CODEX, max_output_tokens=64000) + " {}",
    "repeated-type": '{"type":"response.create","model":"gpt-5.1-codex","input":"x","type":"response.cancel"}',
    "repeated-model": '{"type":"response.create","model":"gpt-5.1-codex","input":"x","model":"gpt-9-omega"}',
    "nan": '{"type":"response.create","model":"gpt-5.1-codex","input":"x","max_output_tokens":NaN}',
    "list": "[" + create(CODEX) + "]",
}


@pytest.mark.parametrize("frame", list(INVALID.values()), ids=list(INVALID))
def test_a_message_the_gateway_cannot_read_is_not_sent(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                      mock_provider: MockProvider, frame: str) -> None:
    """A provider's parser may find a model call in it that the gateway never checked or held."""
    _, key = mint(lg, scan, "invalid")
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        ws.send(frame)
        assert refusal(ws) == "spendgate_invalid_json"
        ws.send(create(CODEX))
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    # Only the valid call went, with the output limit it was held at (it set none).
    assert [json.loads(m.text) for m in sess.messages if m.direction == "in"] == [
        {**json.loads(create(CODEX)), "max_output_tokens": 4096}]


def test_a_binary_frame_is_governed_like_a_text_one(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                    mock_provider: MockProvider) -> None:
    user, key = mint(lg, scan, "binary")
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        ws.send(create(UNPRICED).encode())
        assert refusal(ws) == "spendgate_unpriced_model"
        ws.send(create(CODEX).encode())  # admitted, held and audited; the mock refuses binary frames
        until(ws, *RESPONSES_END)
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [(m.kind, json.loads(m.data)["model"]) for m in sess.messages if m.direction == "in"] == [
        ("binary", CODEX)]
    rows = lg.settled(user, 3)
    calls = [r for r in rows if r["method"] != "GET"]
    assert sorted((r["model_requested"], r["outcome"]) for r in calls) == [
        (CODEX, "upstream_error"), (UNPRICED, "blocked_policy")]


# --------------------------------------------------------------------------- many calls at once


def test_calls_sent_back_to_back_are_each_held_before_they_go(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                              mock_provider: MockProvider) -> None:
    """Six calls of 2,000 output tokens ($0.02 each) sent without waiting, while the first is still
    answering, against $0.05: each is held before it is forwarded, so those that go out (clamped,
    when the rest is short) fit the cap together; the first that does not fit closes the socket
    and the rest never leave."""
    user, key = mint(lg, scan, "burst", cap="0.05")
    slow = {"metadata": {"mock_scenario": "slow; delay_ms=400"}}  # nothing settles (and frees its hold) meanwhile
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        for i in range(6):
            ws.send(create(CODEX, f"call {i}", max_output_tokens=2000, **slow))
        events, closed_at, _ = drain_until_closed(ws, timeout=10)
    assert closed_at is not None, "the socket was not closed at the cap"
    assert "spendgate_budget_exceeded" in [error_code(e) for e in events]
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    sent = [m["max_output_tokens"] for m in creates_seen(sess)]
    assert sent[:2] == [2000, 2000] and len(sent) == 3 and 256 <= sent[2] < 2000, sent  # the third clamped
    assert sum(sent) * CODEX_OUT <= Decimal("0.05"), sent  # what was held for output alone fits
    rows = lg.settled(user, where=lambda rs: any(r["outcome"] == "blocked_cap" for r in rs))
    calls = [r for r in rows if r["method"] != "GET"]
    assert sorted(r["outcome"] == "blocked_cap" for r in calls) == [False] * len(sent) + [True]
    assert sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0)) <= Decimal("0.05")
    assert lg.held("user", user)[1] == 0  # every hold released when the socket closed


def test_holds_are_freed_as_calls_settle(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                         mock_provider: MockProvider) -> None:
    """The same burst against fast answers: a call that settled (at its small real cost) frees its
    hold for the next, so more go out, each still held in full while it is in flight."""
    user, key = mint(lg, scan, "burst-fast", cap="0.05")
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        for i in range(6):
            ws.send(create(CODEX, f"call {i}", max_output_tokens=2000))
            until(ws, *RESPONSES_END)
    rows = lg.settled(user, 7)
    assert [r["outcome"] for r in rows if r["method"] != "GET"] == ["completed"] * 6
    assert sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0)) <= Decimal("0.05")


def test_a_cap_set_while_the_socket_is_open_holds_for_its_next_call(gw_caps: GatewayProcess, lg: Ledger,
                                                                    scan: SecretScan,
                                                                    mock_provider: MockProvider) -> None:
    user, key = mint(lg, scan, "late-cap", cap=None)
    with ws_open(gw_caps, RESPONSES_URL, key) as ws:
        ws.send(create(UNPRICED))  # no cap yet: served, its cost unknown
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
        gw_caps.cli("budgets", "set", "user", user, "--cap", "0.0001", "--period", "day")  # as the socket stays open
        time.sleep(0.5)  # every instance reloads caps within ~0.25 s
        ws.send(create(UNPRICED))
        assert refusal(ws) == "spendgate_unpriced_model"
        ws.send(create(CODEX))  # not even min_output_tokens fit in $0.0001
        events, closed_at, _ = drain_until_closed(ws, timeout=5)
    assert "spendgate_budget_exceeded" in [error_code(e) for e in events] and closed_at is not None
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [m["model"] for m in creates_seen(sess)] == [UNPRICED]
    rows = lg.settled(user, 4)
    assert sorted(r["outcome"] for r in rows if r["method"] != "GET") == ["blocked_cap", "blocked_policy",
                                                                          "completed"]


# --------------------------------------------------------------------------- what the provider bills unasked


def test_a_call_cut_off_by_the_client_is_charged_for_what_it_streamed(gw_caps: GatewayProcess, lg: Ledger,
                                                                       scan: SecretScan,
                                                                       mock_provider: MockProvider) -> None:
    user, key = mint(lg, scan, "hang-up")
    ws = ws_open(gw_caps, RESPONSES_URL, key)
    ws.send(create(CODEX, metadata={"mock_scenario": "slow; chunks=40; delay_ms=40"}))
    deltas = 0
    while deltas < 20:
        ev = json.loads(ws.recv(timeout=10))
        deltas += ev["type"].endswith(".delta")
    ws.close()
    rows = lg.settled(user, 2)
    (call,) = [r for r in rows if r["method"] != "GET"]
    seen = {k: call[k] for k in ("outcome", "input_tokens", "output_tokens", "cost_nusd", "usage_source")}
    assert call["output_tokens"] >= 20, seen  # the mock's pieces are a token each
    assert call["cost_nusd"] is not None and call["cost_nusd"] >= 20 * 10_000, call


def test_a_response_the_server_starts_itself_is_metered(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                        mock_provider: MockProvider) -> None:
    user, key = mint(lg, scan, "vad", cap="0.02")
    usage = {"total_tokens": 200_005, "input_tokens": 200_000, "output_tokens": 5,
             "input_token_details": {"text_tokens": 0, "audio_tokens": 200_000, "cached_tokens": 0},
             "output_token_details": {"text_tokens": 5, "audio_tokens": 0}}
    with ws_open(gw_caps, REALTIME_URL, key) as ws:
        until(ws, "session.created")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 1000}))
        (sess,) = mock_provider.wait_for_ws(1)
        # What server VAD does when the speaker pauses: commit the audio and answer it.
        sess.send({"type": "response.created", "event_id": "event_1", "response": {"id": "resp_vad",
                                                                                     "status": "in_progress"}})
        sess.send({"type": "response.done", "event_id": "event_2", "response": {
            "id": "resp_vad", "status": "completed", "output": [], "usage": usage}})
        assert until(ws, *REALTIME_END)[-1]["type"] == "response.done"
    rows = lg.settled(user, where=lambda rs: any(r["input_tokens"] == 200_000 for r in rs), timeout=3)
    assert usd(lg.held("user", user)[0]) > Decimal("0.02"), rows
