"""WebSockets governed message by message (issue 12), through a real `spendgate serve`: the OpenAI
Responses API's WebSocket mode (Codex CLI's default), the Realtime API and Gemini Live, spoken by
the openai SDK (``responses.connect()`` / ``realtime.connect()``) and by the ``websockets`` client,
both through the gateway as HTTPS proxy.

Identity at the upgrade and while the socket is open (a revoke closes it), the allow-list and a
reservation for every model call, one audit row per model response with the usage the mock
reported (plus the upgrade's own row), refusals as provider-shaped error events that never reach
the mock, and sockets the gateway cannot meter refused for capped callers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.ledger import Ledger, Row, usd
from tests.rig.mock_provider import MockProvider
from tests.rig.mock_ws import RecordedWsSession
from tests.rig.wsclient import (
    GEMINI_WSS,
    LIVE_PATH,
    OPENAI_WSS,
    REALTIME_END,
    RESPONSES_END,
    decode,
    drain_until_closed,
    error_code,
    sdk_next,
    sdk_ws_options,
    until,
    until_live_turn,
    ws_open,
)

CODEX = "gpt-5.1-codex"  # genai-prices: $1.25 / $10 per 1M tokens
REALTIME = "gpt-realtime"  # genai-prices: $4 / $16 per 1M text tokens
LIVE = "gemini-live-2.5-flash-preview"  # genai-prices: $0.50 / $2 per 1M tokens
NUSD_PER_TOKEN = {  # model: (input, output) nano-USD per token
    CODEX: (1250, 10_000), "gpt-4o-mini": (150, 600), REALTIME: (4000, 16_000), LIVE: (500, 2000)}
RESPONSES_URL = f"{OPENAI_WSS}/v1/responses"
REALTIME_URL = f"{OPENAI_WSS}/v1/realtime?model={REALTIME}"
LIVE_URL = GEMINI_WSS + LIVE_PATH
CODEX_HEADERS = {  # what Codex CLI sends on its Responses WebSocket upgrade (besides Authorization)
    "OpenAI-Beta": "responses_websockets=2026-02-06",
    "originator": "codex_cli_rs",
    "session-id": "0199a7f3-0000-7000-8000-000000000001",
    "x-client-request-id": "0199a7f3-0000-7000-8000-000000000001",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    """The defaults (clamp_output = true, unknown_model = "refuse"); prices from genai-prices."""
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-caps-ws"), _mock_provider_session.url, name="caps-ws")
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def lg(gw: GatewayProcess) -> Iterator[Ledger]:
    ledger = Ledger.of(gw)
    yield ledger
    ledger.close()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]  # conftest attaches its log to a failing test's report


# --------------------------------------------------------------------------- helpers


def create(model: str, text: str, **extra: Any) -> str:
    """A Responses ``response.create`` message."""
    return json.dumps({"type": "response.create", "model": model, "input": text, **extra})


def codex_create(text: str, **extra: Any) -> str:
    """A ``response.create`` as Codex sends it (codex-api ResponseCreateWsRequest)."""
    return json.dumps({
        "type": "response.create", "model": CODEX, "instructions": "You are Codex.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
        "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a7f3", **extra,
    })


def mock_scenario(spec: str) -> dict[str, Any]:
    """``metadata`` that makes the mock answer one call with this scenario."""
    return {"metadata": {"mock_scenario": spec}}


def creates_seen(sess: RecordedWsSession) -> list[dict[str, Any]]:
    """The ``response.create`` messages the mock received on a socket."""
    return [m for m in sess.received() if isinstance(m, dict) and m.get("type") == "response.create"]


def cost_nusd(model: str, input_tokens: int, output_tokens: int) -> int:
    i, o = NUSD_PER_TOKEN[model]
    return input_tokens * i + output_tokens * o


def bare(model: str | None) -> str | None:
    return model.removeprefix("models/") if model else model


def rows_for_calls(rows: Sequence[Row], calls: Sequence[tuple[str, int, int]], kind: str | None) -> list[Row]:
    """The audit row of each model call ``(model, input_tokens, output_tokens)`` the mock reported,
    in order: exactly one row each, completed, with the call's kind, tokens and exact cost."""
    found = []
    for model, inp, out in calls:
        match = [r for r in rows if bare(r["model_requested"]) == model and r["input_tokens"] == inp
                 and r["output_tokens"] == out and r not in found]
        assert len(match) == 1, (model, inp, out, [(r["endpoint_kind"], r["model_requested"], r["input_tokens"],
                                                    r["output_tokens"], r["outcome"]) for r in rows])
        r = match[0]
        assert r["outcome"] == "completed", r
        if kind is not None:
            assert r["endpoint_kind"] == kind, r
        assert r["cost_nusd"] is not None and r["cost_nusd"] == cost_nusd(model, inp, out), (r["cost_usd"], model)
        found.append(r)
    return found


def responses_usage(sess: RecordedWsSession) -> list[tuple[str, int, int]]:
    return [(c.model or "", c.usage["input_tokens"], c.usage["output_tokens"]) for c in sess.calls if c.usage]


def wait_spent_over(lg: Ledger, user: str, cap: Decimal, timeout: float = 5.0) -> None:
    """Wait until the user's settled spend is past ``cap`` (the socket stays open meanwhile)."""
    deadline = time.monotonic() + timeout
    while usd(lg.held("user", user)[0]) <= cap:
        assert time.monotonic() < deadline, f"{user}: spend {usd(lg.held('user', user)[0])} never passed {cap}"
        time.sleep(0.05)


def read_refusal(ws: Any, *end: str, timeout: float = 5.0) -> list[Any]:
    """Events after a refused call: up to the first of ``end`` (an error event is one), or to the close."""
    try:
        return until(ws, *end, timeout=timeout)
    except ConnectionClosed:
        return []


# --------------------------------------------------------------------------- identity at the upgrade


@pytest.mark.parametrize("url", [RESPONSES_URL, REALTIME_URL, LIVE_URL], ids=["responses", "realtime", "live"])
def test_no_key_is_refused_at_the_upgrade(gw: GatewayProcess, mock_provider: MockProvider, url: str) -> None:
    with pytest.raises(InvalidStatus) as e:
        ws_open(gw, url, None)
    assert e.value.response.status_code == 401
    assert "error" in json.loads(e.value.response.body or b"{}")  # provider-shaped, naming the fix
    assert mock_provider.ws_sessions == [] and mock_provider.requests == []


def test_a_socket_the_gateway_cannot_meter_is_refused_for_a_capped_caller(
        gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    url = f"{OPENAI_WSS}/v1/something-else"
    with pytest.raises(InvalidStatus) as e:
        ws_open(gw, url, lg.key("ws-unmetered", cap="1.00")["key"])
    assert e.value.response.status_code == 403
    assert mock_provider.ws_sessions == []
    with pytest.raises(InvalidStatus) as e:  # no cap: passed on (and the mock has no such endpoint)
        ws_open(gw, url, lg.key("ws-unmetered-free")["key"])
    assert e.value.response.status_code == 404
    assert [s.path for s in mock_provider.wait_for_ws(1)] == ["/v1/something-else"]


# --------------------------------------------------------------------------- Responses WebSocket mode


def test_responses_websocket_audits_each_response_create(gw: GatewayProcess, lg: Ledger,
                                                         mock_provider: MockProvider) -> None:
    """Three model responses on one socket (the openai SDK's responses.connect()): three rows with the
    usage of their response.completed, and the upgrade's own row."""
    user = "ws-responses"
    key = lg.key(user, cap="1.00")["key"]
    models = [CODEX, "gpt-4o-mini", CODEX]
    client = gw.openai_client(key)
    with client.responses.connect(websocket_connection_options=sdk_ws_options(gw, key)) as conn:
        for i, model in enumerate(models):
            conn.response.create(model=model, input="Say hi." + " again" * (8 * i), store=False)
            done = sdk_next(conn, RESPONSES_END)
            assert done.type == "response.completed", done
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [m["model"] for m in creates_seen(sess)] == models
    assert sess.authorization == f"Bearer {UPSTREAM_KEYS['openai']}"
    calls = responses_usage(sess)
    assert len(calls) == 3
    rows = lg.settled(user, len(calls) + 1)
    found = rows_for_calls(rows, calls, "responses")
    (upgrade,) = [r for r in rows if r not in found]
    assert upgrade["path"].startswith("/v1/responses") and upgrade["method"] == "GET", upgrade
    assert all(r["cost_usd"] > 0 for r in found)


def test_responses_websocket_model_not_allowed_is_an_error_event_and_never_forwarded(
        gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    key = lg.key("ws-picky", models=["gpt-5*"])["key"]
    with ws_open(gw, RESPONSES_URL, key) as ws:
        ws.send(create(CODEX, "hello"))
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
        ws.send(create("gpt-4o", "and now on a model I may not use"))
        events = read_refusal(ws, *RESPONSES_END)
    assert [error_code(e) for e in events if e.get("type") == "error"] == ["spendgate_model_not_allowed"], events
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [m["model"] for m in creates_seen(sess)] == [CODEX]


def test_responses_websocket_past_the_cap_is_refused_mid_socket(gw: GatewayProcess, lg: Ledger,
                                                                mock_provider: MockProvider) -> None:
    user, cap = "ws-capped", Decimal("0.05")
    key = lg.key(user, cap=str(cap))["key"]
    with ws_open(gw, RESPONSES_URL, key) as ws:
        ws.send(create(CODEX, "a big one", **mock_scenario("ok; input_tokens=50000")))  # $0.0625, billed after
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
        wait_spent_over(lg, user, cap)  # settled: the next call is past the cap, not merely reserved against it
        ws.send(create(CODEX, "one more"))
        events = read_refusal(ws, *RESPONSES_END)
    assert "spendgate_budget_exceeded" in [error_code(e) for e in events], events
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert len(creates_seen(sess)) == 1, "the call past the cap reached the provider"
    rows = lg.settled(user, where=lambda rs: any(r["input_tokens"] == 50000 for r in rs))
    (big,) = rows_for_calls(rows, responses_usage(sess), "responses")
    spent = sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0))
    assert spent <= cap + big["cost_usd"], spent


def test_revoking_the_key_closes_the_open_socket_within_1_5_s(gw: GatewayProcess, mock_provider: MockProvider) -> None:
    created = gw.create_key("ws-revoked")  # the CLI, as an admin does it
    with ws_open(gw, RESPONSES_URL, created["key"]) as ws:
        ws.send(create(CODEX, "hello"))
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
        gw.revoke_key(created["key_id"])
        revoked_at = time.monotonic()
        events, closed_at, _ = drain_until_closed(ws, timeout=5)
    assert closed_at is not None, f"socket still open 5 s after the revoke; received {events}"
    assert closed_at - revoked_at <= 1.5, f"closed {closed_at - revoked_at:.2f} s after the revoke"
    assert any(isinstance(e, dict) and e.get("type") == "error" for e in events), events
    (sess,) = mock_provider.wait_for_ws(1)
    sess.wait_closed(3)  # the upstream side is closed too
    assert len(creates_seen(sess)) == 1


# --------------------------------------------------------------------------- Codex CLI's traffic shape


def test_codex_shape_websocket_then_sse_audited_call_by_call_and_refused_past_the_cap(
        gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    """One Responses WebSocket (permessage-deflate, key in Authorization as Codex sends it) with a
    warm-up (generate: false) and two turns, then the same turn over SSE; then a turn that takes the
    spend past the $0.05 cap, after which neither transport gets through."""
    user, cap = "codex", Decimal("0.05")
    key = lg.key(user, cap=str(cap))["key"]
    headers = {**CODEX_HEADERS, "Authorization": f"Bearer {key}"}
    with ws_open(gw, RESPONSES_URL, None, headers=headers) as ws:  # proxy without credentials
        ws.send(codex_create("hello", generate=False))
        warm = until(ws, *RESPONSES_END)
        assert [e["type"] for e in warm] == ["response.created", "response.completed"]
        ws.send(codex_create("list the files in this repository"))
        first = until(ws, *RESPONSES_END)[-1]
        assert first["type"] == "response.completed"
        ws.send(codex_create("now run the tests and tell me what failed", previous_response_id=first["response"]["id"]))
        assert until(ws, *RESPONSES_END)[-1]["type"] == "response.completed"
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert sess.authorization == f"Bearer {UPSTREAM_KEYS['openai']}"  # the gateway key never leaves
    ws_calls = responses_usage(sess)
    assert len(ws_calls) == 3 and ws_calls[0][2] == 0  # the warm-up generates nothing

    client = gw.openai_client(key)
    turn = json.loads(codex_create("now run the tests and tell me what failed"))
    sse_args = {k: turn[k] for k in ("model", "instructions", "input", "tools", "tool_choice", "parallel_tool_calls",
                                     "reasoning", "store", "include", "prompt_cache_key")}
    events = list(client.responses.create(stream=True, **sse_args))
    assert events[-1].type == "response.completed"
    sse = mock_provider.find(endpoint="responses")
    assert len(sse) == 1 and sse[0].stream
    sse_call = (CODEX, sse[0].usage["input_tokens"], sse[0].usage["output_tokens"])

    rows = lg.settled(user, 5)  # the upgrade, three WebSocket calls, one SSE request
    found = rows_for_calls(rows, [*ws_calls, sse_call], "responses")
    warm_row, sse_row = found[0], found[-1]
    assert warm_row["output_tokens"] == 0 and warm_row["cost_usd"] < Decimal("0.001")  # one row, ~$0
    assert sse_row["stream"] in (True, 1) and sse_row["method"] == "POST"
    (upgrade,) = [r for r in rows if r not in found]
    assert upgrade["path"].startswith("/v1/responses")

    # A turn the provider bills at 40,000 prompt tokens ($0.05): the spend passes the cap.
    list(client.responses.create(stream=True, **sse_args, extra_headers={"x-mock-scenario": "ok; input_tokens=40000"}))
    lg.settled(user, 6)
    assert usd(lg.held("user", user)[0]) > cap
    try:
        with ws_open(gw, RESPONSES_URL, None, headers=headers) as ws:
            ws.send(codex_create("one more thing"))
            refused = read_refusal(ws, *RESPONSES_END)
        assert "spendgate_budget_exceeded" in [error_code(e) for e in refused], refused
    except InvalidStatus as e:  # or refused at the upgrade already
        assert e.response.status_code == 429, e.response.status_code
    with pytest.raises(openai.RateLimitError) as oi:
        client.responses.create(stream=True, **sse_args)
    assert oi.value.code == "spendgate_budget_exceeded"
    later = mock_provider.ws_sessions[1:]
    assert all(creates_seen(s) == [] for s in later), "a call past the cap reached the provider"
    assert len(mock_provider.find(endpoint="responses")) == 2
    rows = lg.settled(user, where=lambda rs: any(r["outcome"] == "blocked_cap" and r["method"] == "POST" for r in rs))
    spent = sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0))
    one_request = usd(cost_nusd(CODEX, 40000, 5)) + Decimal("0.001")  # the big turn (and its share of instructions)
    assert spent <= cap + one_request, spent


# --------------------------------------------------------------------------- Realtime


def test_realtime_audits_each_response_done(gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    """Two responses on one Realtime socket (the openai SDK's realtime.connect()): two rows with the
    usage of their response.done, and the upgrade's own row."""
    user = "ws-realtime"
    key = lg.key(user, cap="1.00")["key"]
    usages = []
    with gw.openai_client(key).realtime.connect(model=REALTIME,
                                                websocket_connection_options=sdk_ws_options(gw, key)) as conn:
        for text in ("Say hello", "And now say goodbye, at somewhat greater length"):
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_text", "text": text}]})
            conn.response.create()
            done = sdk_next(conn, REALTIME_END)
            assert done.type == "response.done", done
            usages.append((REALTIME, done.response.usage.input_tokens, done.response.usage.output_tokens))
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert [(c.model, c.usage["input_tokens"], c.usage["output_tokens"]) for c in sess.calls] == usages
    rows = lg.settled(user, 3)
    found = rows_for_calls(rows, usages, "realtime")
    (upgrade,) = [r for r in rows if r not in found]
    assert upgrade["path"].startswith("/v1/realtime")


def test_realtime_model_change_to_a_model_not_allowed_is_refused(gw: GatewayProcess, lg: Ledger,
                                                                 mock_provider: MockProvider) -> None:
    key = lg.key("ws-realtime-picky", models=["gpt-realtime*"])["key"]
    with ws_open(gw, REALTIME_URL, key) as ws:
        until(ws, "session.created")
        ws.send(json.dumps({"type": "session.update",
                            "session": {"type": "realtime", "model": "gpt-4o-realtime-preview"}}))
        ws.send(json.dumps({"type": "response.create"}))
        events = read_refusal(ws, "error")
    assert "spendgate_model_not_allowed" in [error_code(e) for e in events], events
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert all(c.model != "gpt-4o-realtime-preview" for c in sess.calls), [c.model for c in sess.calls]


def test_realtime_past_the_cap_is_refused_mid_socket(gw: GatewayProcess, lg: Ledger,
                                                     mock_provider: MockProvider) -> None:
    """The issue's Realtime hole: a $0.02 cap passed with 200,000 tokens, audited as 0."""
    user, cap = "ws-realtime-capped", Decimal("0.02")
    key = lg.key(user, cap=str(cap))["key"]
    with ws_open(gw, REALTIME_URL, key) as ws:
        until(ws, "session.created")
        ws.send(json.dumps({"type": "response.create", "response": {
            "max_output_tokens": 64, **mock_scenario("ok; input_tokens=200000")}}))
        done = until(ws, *REALTIME_END)[-1]
        assert done["type"] == "response.done" and done["response"]["usage"]["input_tokens"] == 200000
        wait_spent_over(lg, user, cap)  # settled: the next call is past the cap
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 64}}))
        events = read_refusal(ws, *REALTIME_END)
    assert "spendgate_budget_exceeded" in [error_code(e) for e in events], events
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert len(sess.calls) == 1, "the call past the cap reached the provider"
    rows = lg.settled(user, where=lambda rs: any(r["input_tokens"] == 200000 for r in rs))
    (big,) = rows_for_calls(rows, [(REALTIME, 200000, 5)], "realtime")
    assert big["cost_usd"] == usd(cost_nusd(REALTIME, 200000, 5))  # $0.80, not 0
    spent = sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0))
    assert spent <= cap + big["cost_usd"], spent


# --------------------------------------------------------------------------- Gemini Live


def live_setup() -> str:
    return json.dumps({"setup": {"model": f"models/{LIVE}", "generationConfig": {"responseModalities": ["TEXT"]}}})


def live_turn(text: str) -> str:
    return json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": True}})


def test_gemini_live_audits_each_turn(gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    user = "ws-live"
    key = lg.key(user, cap="1.00")["key"]
    calls = []
    with ws_open(gw, LIVE_URL, key) as ws:
        ws.send(live_setup())
        assert decode(ws.recv(timeout=10)) == {"setupComplete": {}}
        for text in ("Hello", "And a second, longer turn, please"):
            ws.send(live_turn(text))
            u = until_live_turn(ws)[-1]["usageMetadata"]
            calls.append((LIVE, u["promptTokenCount"], u["responseTokenCount"]))
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert len(sess.calls) == 2
    rows = lg.settled(user, 3)
    found = rows_for_calls(rows, calls, None)  # endpoint_kind: not named by the issue for Gemini Live
    (upgrade,) = [r for r in rows if r not in found]
    assert "BidiGenerateContent" in upgrade["path"]


def test_gemini_live_past_the_cap_is_refused(gw: GatewayProcess, lg: Ledger, mock_provider: MockProvider) -> None:
    user, cap = "ws-live-capped", Decimal("0.05")
    key = lg.key(user, cap=str(cap))["key"]
    with ws_open(gw, LIVE_URL, key, headers={"x-mock-scenario": "ok; input_tokens=200000"}) as ws:  # $0.10 a turn
        ws.send(live_setup())
        assert decode(ws.recv(timeout=10)) == {"setupComplete": {}}
        ws.send(live_turn("Hello"))
        until_live_turn(ws)
        wait_spent_over(lg, user, cap)  # settled: the next turn is past the cap
        ws.send(live_turn("Again"))
        events, closed_at, close = drain_until_closed(ws, timeout=5)
    said = json.dumps(events) + (close.rcvd.reason if close is not None and close.rcvd is not None else "")
    assert "spendgate_budget_exceeded" in said or re.search(r"\bcap\b", said), (events, close)
    assert not any(isinstance(e, dict) and (e.get("serverContent") or {}).get("turnComplete") for e in events)
    (sess,) = mock_provider.wait_for_ws(1, closed=True)
    assert len(sess.calls) == 1, "the turn past the cap reached the provider"
    rows = lg.settled(user, where=lambda rs: any(r["input_tokens"] == 200000 for r in rs))
    spent = sum((r["cost_usd"] or Decimal(0) for r in rows), Decimal(0))
    assert spent <= cap + usd(cost_nusd(LIVE, 200000, 5)), spent
