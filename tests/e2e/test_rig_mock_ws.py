"""The mock provider's WebSocket endpoints, spoken to directly (no gateway) with real clients:
the ``websockets`` library, the ``openai`` SDK's Responses / Realtime connections, and wsproto."""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any

import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from tests.rig.mock_provider import MockProvider, content_pieces

LIVE_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
CODEX_HEADERS = {  # what Codex CLI sends on its Responses WebSocket upgrade (codex-rs core/src/client.rs)
    "Authorization": "Bearer sk-codex",
    "OpenAI-Beta": "responses_websockets=2026-02-06",
    "originator": "codex_cli_rs",
    "session-id": "0199a7f3-0000-7000-8000-000000000001",
    "x-client-request-id": "0199a7f3-0000-7000-8000-000000000001",
}


@pytest.fixture
def ctx(mock_provider: MockProvider) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(mock_provider.cert_path))


@pytest.fixture
def wss(mock_provider: MockProvider, ctx: ssl.SSLContext) -> Any:
    def open_(path: str, headers: dict[str, str] | None = None, **kw: Any) -> ClientConnection:
        return connect(mock_provider.url.replace("https://", "wss://") + path, ssl=ctx,
                       additional_headers=headers or {}, open_timeout=5, **kw)
    return open_


def codex_create(text: str, **extra: Any) -> str:
    """A ``response.create`` as Codex sends it (codex-api ResponseCreateWsRequest)."""
    return json.dumps({
        "type": "response.create", "model": "gpt-5.1-codex", "instructions": "You are Codex.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
        "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a7f3", **extra,
    })


def until(ws: ClientConnection, *types: str, timeout: float = 5) -> list[dict[str, Any]]:
    """Events up to and including the first of ``types``."""
    out = []
    while True:
        ev = json.loads(ws.recv(timeout=timeout))
        out.append(ev)
        if ev.get("type") in types:
            return out


def expected_input(frame: str) -> int:
    return 10 + len(frame.encode()) // 4


# --------------------------------------------------------------------------- Responses WebSocket mode


def test_codex_shape_several_creates_on_one_socket(wss: Any, mock_provider: MockProvider) -> None:
    frames = [codex_create("hello"), codex_create("again, a longer turn", previous_response_id="resp_x")]
    with wss("/v1/responses", CODEX_HEADERS) as ws:
        got = []
        for f in frames:
            ws.send(f)
            got.append(until(ws, "response.completed"))
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert (sess.provider, sess.endpoint, sess.status, sess.model) == ("openai", "responses_ws", 101, "gpt-5.1-codex")
    assert sess.authorization == "Bearer sk-codex" and sess.header("OpenAI-Beta") == "responses_websockets=2026-02-06"
    assert sess.deflate and sess.extensions.startswith("permessage-deflate")  # websockets offers it by default
    assert sess.closed_by == "client" and sess.close_code == 1000
    up = mock_provider.wait_for(1)[0]  # the upgrade is a recorded request too
    assert (up.method, up.path, up.endpoint, up.response_status) == ("GET", "/v1/responses", "responses_ws", 101)
    assert up.headers["authorization"] == "Bearer sk-codex"
    names = [e["type"] for e in got[0]]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 5,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e["sequence_number"] for e in got[0]] == list(range(len(names)))
    text = "".join(e["delta"] for e in got[0] if e["type"] == "response.output_text.delta")
    assert text == "".join(content_pieces(5))
    assert len(sess.calls) == 2 and all(c.completed and c.usage_sent for c in sess.calls)
    for frame, events, call in zip(frames, got, sess.calls):
        usage = events[-1]["response"]["usage"]
        assert usage == call.usage == {"input_tokens": expected_input(frame),
                                       "input_tokens_details": {"cached_tokens": 0},
                                       "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                                       "total_tokens": expected_input(frame) + 5}
        assert events[-1]["response"]["id"] == call.response_id and call.event_types() == [e["type"] for e in events]
    assert got[1][-1]["response"]["previous_response_id"] == "resp_x"
    assert [m["type"] for m in sess.received()] == ["response.create", "response.create"]


def test_openai_sdk_responses_connect(mock_provider: MockProvider, ctx: ssl.SSLContext) -> None:
    oai = openai.OpenAI(api_key="sdk-key", base_url=f"{mock_provider.url}/v1", max_retries=0,
                        http_client=openai.DefaultHttpxClient(verify=ctx, trust_env=False))
    mock_provider.set_next("ok", chunks=3, match="/v1/responses")
    with oai.responses.connect(websocket_connection_options={"ssl": ctx}) as conn:
        conn.response.create(model="gpt-5.1-codex", input="hello", store=False)
        done = next(ev for ev in conn if ev.type == "response.completed")
    assert done.response.usage is not None and done.response.usage.output_tokens == 3
    assert done.response.output_text == "".join(content_pieces(3))
    assert mock_provider.wait_for_ws(1)[0].authorization == "Bearer sdk-key"


def test_responses_ws_scenarios(wss: Any, mock_provider: MockProvider) -> None:
    mock_provider.set_next("error429", match="/v1/responses")  # consumed by the first response.create
    mock_provider.set_next("failed; truncate_after=2", match="/v1/responses")
    with wss("/v1/responses", CODEX_HEADERS) as ws:
        ws.send(codex_create("a"))
        err = until(ws, "error")[-1]
        assert err["status"] == 429 and err["error"]["code"] == "rate_limit_exceeded" and err["error"]["message"]
        ws.send(codex_create("b"))
        evs = until(ws, "response.failed")
        assert sum(e["type"] == "response.output_text.delta" for e in evs) == 2
        assert evs[-1]["response"]["status"] == "failed" and evs[-1]["response"]["error"]["code"] == "server_error"
        ws.send(codex_create("c", metadata={"mock_scenario": "slow; delay_ms=40; chunks=3"}))
        t0 = time.monotonic()
        until(ws, "response.completed")
        assert time.monotonic() - t0 >= 0.3  # 9 gaps of 40 ms
        ws.send(codex_create("d", generate=False))  # Codex's warm-up
        warm = until(ws, "response.completed")
        assert [e["type"] for e in warm] == ["response.created", "response.completed"]
        assert warm[-1]["response"]["usage"]["output_tokens"] == 0
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert [(c.failed, c.completed) for c in sess.calls] == [(True, False), (True, False), (False, True), (False, True)]
    assert not sess.calls[0].usage_sent and not sess.calls[1].usage_sent
    assert sess.calls[2].scenario.chunks == 3 and sess.calls[2].tokens["output_tokens"] == 3


def test_responses_ws_hang_and_truncate(wss: Any, mock_provider: MockProvider) -> None:
    with wss("/v1/responses", {**CODEX_HEADERS, "x-mock-scenario": "hang; hang_ms=400; chunks=2"}) as ws:
        ws.send(codex_create("x"))
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)
        assert until(ws, "response.completed")[-1]["response"]["usage"]["output_tokens"] == 2
        ws.ping()  # pings are answered while idle
    assert mock_provider.wait_for_ws(1, closed=True)[0].pings >= 1

    with wss("/v1/responses", {**CODEX_HEADERS, "x-mock-scenario": "truncate; truncate_after=1"}) as ws:
        ws.send(codex_create("y"))
        with pytest.raises(ConnectionClosed) as exc:
            until(ws, "response.completed")
        assert exc.value.rcvd is None  # no close frame: the TCP connection was cut
    sess = mock_provider.wait_for_ws(2, closed=True)[1]
    assert sess.closed_by == "abort" and not sess.calls[0].completed and not sess.calls[0].usage_sent
    assert sum(e["type"] == "response.output_text.delta" for e in sess.calls[0].events) == 1


def test_ws_upgrade_refused(wss: Any, mock_provider: MockProvider) -> None:
    mock_provider.expect_key("openai", "sk-right")
    with pytest.raises(InvalidStatus) as exc:
        wss("/v1/responses", {"Authorization": "Bearer sk-wrong"})
    assert exc.value.response.status_code == 401
    assert json.loads(exc.value.response.body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(InvalidStatus) as exc:
        wss("/v1/responses", {"Authorization": "Bearer sk-right", "x-mock-scenario": "reject; status=403"})
    assert exc.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as exc:
        wss("/v1/nothing-here", {"Authorization": "Bearer sk-right"})
    assert exc.value.response.status_code == 404
    with wss("/v1/responses", {"Authorization": "Bearer sk-right"}):
        pass
    assert [s.status for s in mock_provider.wait_for_ws(4, closed=True)] == [401, 403, 404, 101]


def test_server_close_push_and_binary(wss: Any, mock_provider: MockProvider) -> None:
    with wss("/v1/responses", CODEX_HEADERS) as ws:
        sess = mock_provider.wait_for_ws(1)[0]
        sess.send({"type": "codex.rate_limits", "plan_type": "plus"})
        assert json.loads(ws.recv(timeout=5))["type"] == "codex.rate_limits"
        ws.send(b"\x00\x01binary")
        assert until(ws, "error")[-1]["status"] == 400
        sess.server_close(4000, "bye")
        with pytest.raises(ConnectionClosed) as exc:
            ws.recv(timeout=5)
        assert exc.value.rcvd.code == 4000 and exc.value.rcvd.reason == "bye"
    sess.wait_closed()
    assert sess.closed_by == "server" and sess.server_close_code == 4000
    assert [m.kind for m in sess.messages if m.direction == "in"] == ["binary"]


@pytest.mark.parametrize("deflate", [True, False])
def test_permessage_deflate_on_the_wire(mock_provider: MockProvider, ctx: ssl.SSLContext, deflate: bool) -> None:
    """A wsproto client on a raw TLS socket: the server's frames carry RSV1 (compressed) only when
    permessage-deflate was negotiated, and decode to the same events either way."""
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", mock_provider.port), timeout=5),
                           server_hostname="127.0.0.1")
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="api.openai.com", target="/v1/responses",
                                 extensions=[PerMessageDeflate()] if deflate else [],
                                 extra_headers=[(b"authorization", b"Bearer raw")])))
    frame = codex_create("z" * 400)
    first_byte: int | None = None
    events: list[dict[str, Any]] = []
    text = ""
    with sock:
        while not events or events[-1]["type"] != "response.completed":
            data = sock.recv(65536)
            assert data, "connection closed early"
            if ws.state.name == "OPEN" and first_byte is None:  # bytes of server frames
                first_byte = data[0]
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, AcceptConnection):
                    assert bool(ev.extensions) == deflate
                    sock.sendall(ws.send(TextMessage(data=frame)))
                elif isinstance(ev, TextMessage):
                    text += ev.data
                    if ev.message_finished:
                        events.append(json.loads(text))
                        text = ""
        sock.sendall(ws.send(CloseConnection(code=1000)))
    assert first_byte is not None and first_byte & 0x0F == 0x1  # a text frame
    assert bool(first_byte & 0x40) == deflate  # RSV1: compressed
    assert events[-1]["response"]["usage"]["input_tokens"] == expected_input(frame)
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert sess.deflate is deflate and sess.received()[0]["input"][0]["content"][0]["text"] == "z" * 400


# --------------------------------------------------------------------------- OpenAI Realtime


def test_realtime_session_items_and_response(wss: Any, mock_provider: MockProvider) -> None:
    with wss("/v1/realtime?model=gpt-realtime", {"Authorization": "Bearer rt"}) as ws:
        created = json.loads(ws.recv(timeout=5))
        assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime"
        ws.send(json.dumps({"type": "session.update",
                            "session": {"type": "realtime", "model": "gpt-realtime-mini", "instructions": "Be brief.",
                                        "output_modalities": ["text"]}}))
        upd = until(ws, "session.updated")[-1]
        assert upd["session"]["instructions"] == "Be brief." and upd["session"]["model"] == "gpt-realtime-mini"
        item = json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}})
        ws.send(item)
        assert [e["type"] for e in until(ws, "conversation.item.done")] == ["conversation.item.added",
                                                                            "conversation.item.done"]
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 2400}))  # 7200 bytes
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        until(ws, "conversation.item.done")
        create = json.dumps({"type": "response.create"})
        ws.send(create)
        evs = until(ws, "response.done")
    names = [e["type"] for e in evs]
    assert names[:3] == ["response.created", "rate_limits.updated", "response.output_item.added"]
    assert names.count("response.output_text.delta") == 5 and "response.text.delta" not in names
    assert names[-4:] == ["response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"]
    done = evs[-1]["response"]
    text_in = 10 + (len(item.encode()) + len(create.encode())) // 4
    assert done["status"] == "completed" and done["output"][0]["content"][0] == {
        "type": "output_text", "text": "".join(content_pieces(5))}
    assert done["usage"]["input_token_details"]["text_tokens"] == text_in
    assert done["usage"]["input_token_details"]["audio_tokens"] == 1  # 7200 bytes // 4800
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"]) == (text_in + 1, 5)
    assert done["usage"]["output_token_details"] == {"text_tokens": 5, "audio_tokens": 0}
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert sess.endpoint == "realtime" and sess.model == "gpt-realtime-mini" and sess.query == "model=gpt-realtime"
    assert sess.calls[0].usage == done["usage"] and sess.calls[0].model == "gpt-realtime-mini"


def test_realtime_beta_names_errors_and_sdk(wss: Any, mock_provider: MockProvider, ctx: ssl.SSLContext) -> None:
    beta = {"Authorization": "Bearer rt", "OpenAI-Beta": "realtime=v1"}
    with wss("/v1/realtime?model=gpt-4o-realtime-preview", beta) as ws:
        until(ws, "session.created")
        ws.send(json.dumps({"type": "response.create", "response": {"modalities": ["text"]}}))
        names = [e["type"] for e in until(ws, "response.done")]
        assert "response.text.delta" in names and "conversation.item.created" in names
        ws.send(json.dumps({"type": "response.create", "response": {"metadata": {"mock_scenario": "error500"}}}))
        assert until(ws, "error")[-1]["error"]["type"] == "server_error"
        ws.send(json.dumps({"type": "response.create", "response": {"metadata": {"mock_scenario": "failed"}}}))
        failed = until(ws, "response.done")[-1]["response"]
        assert failed["status"] == "failed" and failed["status_details"]["error"]["type"] == "server_error"
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert [c.completed for c in sess.calls] == [True, False, False]

    oai = openai.OpenAI(api_key="sdk-key", base_url=f"{mock_provider.url}/v1", max_retries=0,
                        http_client=openai.DefaultHttpxClient(verify=ctx, trust_env=False))
    with oai.realtime.connect(model="gpt-realtime", websocket_connection_options={"ssl": ctx}) as conn:
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hi"}]})
        conn.response.create()
        done = next(ev for ev in conn if ev.type == "response.done")
    assert done.response.usage is not None and done.response.usage.output_tokens == 5


# --------------------------------------------------------------------------- Gemini Live


def test_gemini_live_turns(wss: Any, mock_provider: MockProvider) -> None:
    setup = json.dumps({"setup": {"model": "models/gemini-2.0-flash-live-001",
                                  "generationConfig": {"responseModalities": ["TEXT"]}}})
    turn = json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "Hello"}]}],
                                         "turnComplete": True}})
    with wss(LIVE_PATH + "?key=gk") as ws:
        ws.send(setup)
        first = ws.recv(timeout=5)
        assert isinstance(first, bytes) and json.loads(first) == {"setupComplete": {}}  # binary frames
        ws.send(turn)
        msgs = []
        while not msgs or not msgs[-1].get("serverContent", {}).get("turnComplete"):
            msgs.append(json.loads(ws.recv(timeout=5)))
        ws.send(json.dumps({"realtimeInput": {"text": "and again"}}))
        while not json.loads(ws.recv(timeout=5)).get("serverContent", {}).get("turnComplete"):
            pass
    parts = [m["serverContent"]["modelTurn"]["parts"][0]["text"] for m in msgs
             if "modelTurn" in m.get("serverContent", {})]
    assert "".join(parts) == "".join(content_pieces(5))
    assert msgs[-2] == {"serverContent": {"generationComplete": True}}
    prompt = 10 + (len(setup.encode()) + len(turn.encode())) // 4
    assert msgs[-1]["usageMetadata"] == {
        "promptTokenCount": prompt, "responseTokenCount": 5, "totalTokenCount": prompt + 5,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        "responseTokensDetails": [{"modality": "TEXT", "tokenCount": 5}]}
    sess = mock_provider.wait_for_ws(1, closed=True)[0]
    assert (sess.provider, sess.endpoint, sess.model) == ("gemini", "live", "gemini-2.0-flash-live-001")
    assert len(sess.calls) == 2 and sess.calls[1].usage["promptTokenCount"] > prompt  # the context grows
    assert sess.request.query_params["key"] == ["gk"]


def test_gemini_live_errors(wss: Any, mock_provider: MockProvider) -> None:
    setup = json.dumps({"setup": {"model": "models/gemini-live-2.5-flash-preview"}})
    with wss(LIVE_PATH, {"x-goog-api-key": "gk", "x-mock-scenario": "error500; text_frames"}) as ws:
        ws.send(setup)
        assert isinstance(ws.recv(timeout=5), str)  # text_frames
        ws.send(json.dumps({"realtimeInput": {"text": "hi"}}))
        with pytest.raises(ConnectionClosed) as exc:
            ws.recv(timeout=5)
        assert exc.value.rcvd.code == 1011
    mock_provider.expect_key("gemini", "right")
    with wss(LIVE_PATH + "?key=wrong") as ws:
        with pytest.raises(ConnectionClosed) as exc:
            ws.recv(timeout=5)
        assert exc.value.rcvd.code == 1008 and "API key not valid" in exc.value.rcvd.reason
    a, b = mock_provider.wait_for_ws(2, closed=True)
    assert a.calls[0].failed and a.closed_by == "server" and b.server_close_code == 1008
