"""spendgate.providers.sockets: what each WebSocket protocol's messages ask the model for, and what
the provider's messages say about a call. Messages shaped as the providers document them: the
Responses API's WebSocket mode (Codex CLI) and Gemini Live here; the Realtime API in
test_sockets_realtime.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from spendgate.providers.sockets import (
    ClientStep,
    LiveSocket,
    RealtimeSocket,
    ResponsesSocket,
    ServerStep,
    SocketProtocol,
    protocol_for,
)
from spendgate.providers.wire import EndpointKind, Family

K = EndpointKind
LIVE_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


def client(proto: SocketProtocol, event: dict[str, Any]) -> ClientStep:
    return proto.from_client(event, json.dumps(event).encode())


# --- which protocol an upgrade speaks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, path, headers, kind, model",
    [
        (Family.OPENAI, "/v1/responses", None, ResponsesSocket, None),
        (Family.OPENAI, "/v1/responses/", None, ResponsesSocket, None),
        (Family.OPENAI, "/v1/realtime?model=gpt-realtime", None, RealtimeSocket, "gpt-realtime"),
        (Family.OPENAI, "/v1/realtime/?model=gpt-realtime&x=1", None, RealtimeSocket, "gpt-realtime"),
        (Family.OPENAI, "/v1/realtime", None, RealtimeSocket, None),  # the model comes with session.update
        # Azure names its deployment.
        (Family.OPENAI, "/openai/realtime?api-version=2025-04-01-preview&deployment=rt-prod", None, RealtimeSocket,
         "rt-prod"),
        (Family.OPENAI, "/v1/something-else", None, None, None),
        (Family.OPENAI, "/v1/chat/completions", None, None, None),
        (Family.ANTHROPIC, "/v1/responses", None, None, None),  # Anthropic has no WebSocket API
        (Family.GEMINI, LIVE_PATH, None, LiveSocket, None),
        (Family.GEMINI, LIVE_PATH + "Constrained?access_token=t", None, LiveSocket, None),
        (Family.GEMINI, "/ws/other.Service.Bidi", None, None, None),
        (Family.GEMINI, "/v1/responses", None, None, None),
    ],
)
def test_protocol_for(family: Family, path: str, headers: dict[str, str] | None, kind: type | None,
                      model: str | None) -> None:
    proto = protocol_for(family, path, headers)
    if kind is None:
        assert proto is None
        return
    assert type(proto) is kind
    assert proto is not None and proto.model == model


@pytest.mark.parametrize("header, beta", [("realtime=v1", True), ("Realtime=V1", True), ("", False), (None, False)])
def test_realtime_beta_is_read_from_the_upgrade(header: str | None, beta: bool) -> None:
    proto = protocol_for(Family.OPENAI, "/v1/realtime?model=m", {"openai-beta": header} if header is not None else {})
    assert isinstance(proto, RealtimeSocket) and proto.beta is beta


@pytest.mark.parametrize("proto, endpoint_kind, error_events", [
    (ResponsesSocket(None), K.RESPONSES, True), (RealtimeSocket(None, False), K.REALTIME, True),
    (LiveSocket(None), K.REALTIME, False),
])
def test_kinds(proto: SocketProtocol, endpoint_kind: EndpointKind, error_events: bool) -> None:
    assert (proto.endpoint_kind, proto.error_events) == (endpoint_kind, error_events)


# --- Responses WebSocket mode ---------------------------------------------------------------------------

CODEX_CREATE = {
    "type": "response.create", "model": "gpt-5.1-codex", "instructions": "You are Codex.",
    "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]}],
    "tools": [], "store": False, "stream": True, "max_output_tokens": 64000,
}


@pytest.mark.parametrize(
    "event, model, limit",
    [
        (CODEX_CREATE, "gpt-5.1-codex", 64000),
        ({"type": "response.create", "model": "o3", "input": "hi"}, "o3", None),
        ({"type": "response.create", "model": "o3", "input": "hi", "max_output_tokens": True}, "o3", None),
        ({"type": "response.append", "model": "o3", "input": "more"}, "o3", None),
        # A warm-up generates nothing: it is still a call (its prompt is billed), with no output.
        ({**CODEX_CREATE, "generate": False}, "gpt-5.1-codex", 0),
    ],
)
def test_responses_create_is_one_call(event: dict[str, Any], model: str, limit: int | None) -> None:
    step = client(ResponsesSocket(None), event)
    call = step.call
    assert call is not None and step.model is None and step.replace is None
    assert (call.kind, call.model, call.max_output_tokens) == (K.RESPONSES, model, limit)
    assert "type" not in call.body and call.body["model"] == model
    assert call.body.get("input") == event["input"]  # the prompt, as the HTTP API gets it
    assert call.client_event_id is None


def test_responses_create_without_a_model_is_the_socket_s_last_model() -> None:
    proto = ResponsesSocket(None)
    client(proto, {"type": "response.create", "model": "gpt-5", "input": "a"})
    call = client(proto, {"type": "response.create", "input": "b"}).call
    assert call is not None and call.model == "gpt-5" and proto.model == "gpt-5"
    anonymous = client(ResponsesSocket(None), {"type": "response.create", "input": "b"}).call
    assert anonymous is not None and anonymous.model is None  # no model at all: the caps refuse it as unpriced


@pytest.mark.parametrize("event", [
    {"type": "response.cancel"}, {"type": "session.update", "session": {"model": "o3"}}, {"type": None},
    {"model": "o3", "input": "no type"}, {"type": ["response.create"]},
])
def test_responses_messages_that_start_no_call(event: dict[str, Any]) -> None:
    assert client(ResponsesSocket("gpt-5"), event) == ClientStep()


@pytest.mark.parametrize("event", [CODEX_CREATE, {**CODEX_CREATE, "generate": False},
                                   {"type": "response.create", "model": "o3", "input": "x"}])
def test_responses_limit_rewrites_only_max_output_tokens(event: dict[str, Any]) -> None:
    call = client(ResponsesSocket(None), event).call
    assert call is not None and call.limit is not None
    assert call.limit(300) == json.dumps({**event, "max_output_tokens": 300}, separators=(",", ":")).encode()


RESP = {"id": "resp_1", "object": "response", "model": "gpt-5.1-codex",
        "usage": {"input_tokens": 40, "output_tokens": 7}}


@pytest.mark.parametrize(
    "event, step",
    [
        ({"type": "response.created", "response": {**RESP, "usage": None}}, ServerStep(response_id="resp_1")),
        ({"type": "response.in_progress", "response": RESP}, ServerStep()),
        # the text is kept for an estimate should the call be cut short
        ({"type": "response.output_text.delta", "delta": "Hi"}, ServerStep(output=True, text="Hi")),
        ({"type": "response.reasoning_summary_text.delta", "delta": "hm"}, ServerStep(output=True, text="hm")),
        ({"type": "response.function_call_arguments.delta", "delta": "{"}, ServerStep(output=True, text="{")),
        ({"type": "response.output_text.done", "text": "Hi"}, ServerStep()),
        ({"type": "response.completed", "response": RESP}, ServerStep(response_id="resp_1", done=RESP)),
        ({"type": "response.incomplete", "response": RESP}, ServerStep(response_id="resp_1", done=RESP)),
        ({"type": "response.failed", "response": {**RESP, "error": {"message": "boom"}}},
         ServerStep(response_id="resp_1", done={**RESP, "error": {"message": "boom"}}, status=500,
                    error="response failed: boom")),
        ({"type": "response.failed", "response": {"id": "resp_2"}},
         ServerStep(response_id="resp_2", done={"id": "resp_2"}, status=500, error="response failed: upstream error")),
        ({"type": "error", "status": 429, "error": {"type": "rate_limit_error", "message": "slow down"}},
         ServerStep(done={}, status=429, error="upstream error: slow down")),
        ({"type": "error", "error": {"code": "previous_response_not_found"}},
         ServerStep(done={}, status=400, error="upstream error: previous_response_not_found")),
        ({"type": "error", "status": 200, "error": "not a mapping"}, ServerStep(done={}, status=400,
                                                                               error="upstream error: None")),
        ({"type": 7}, ServerStep()),
        ({}, ServerStep()),
    ],
)
def test_responses_server_events(event: dict[str, Any], step: ServerStep) -> None:
    assert ResponsesSocket("gpt-5").from_server(event) == step


def test_responses_error_text_is_bounded() -> None:
    step = ResponsesSocket(None).from_server({"type": "error", "error": {"message": "x" * 10_000}})
    assert step.error is not None and len(step.error) == 500


@pytest.mark.parametrize("status, err_type", [(401, "authentication_error"), (403, "permission_error"),
                                              (429, "rate_limit_error"), (500, "invalid_request_error")])
def test_responses_error_event_is_openai_shaped(status: int, err_type: str) -> None:
    raw = ResponsesSocket(None).error_event(status, "spendgate_budget_exceeded", "Spend cap reached.")
    assert raw is not None
    assert json.loads(raw) == {"type": "error", "status": status, "error": {
        "type": err_type, "code": "spendgate_budget_exceeded", "message": "Spend cap reached.", "param": None}}
    with_id = ResponsesSocket(None).error_event(status, "c", "m", "evt_1")
    assert with_id is not None and json.loads(with_id)["error"]["event_id"] == "evt_1"


# --- Gemini Live --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup, model, max_output", [
    ({"model": "models/gemini-live-2.5-flash-preview", "generationConfig": {"maxOutputTokens": 500}},
     "gemini-live-2.5-flash-preview", 500),
    ({"model": "gemini-2.0-flash-live-001", "generation_config": {"maxOutputTokens": 70}},
     "gemini-2.0-flash-live-001", 70),
    ({"generationConfig": {"responseModalities": ["AUDIO"]}}, None, None),
])
def test_live_setup_names_the_model_and_the_config(setup: dict[str, Any], model: str | None,
                                                   max_output: int | None) -> None:
    proto = LiveSocket(None)
    assert client(proto, {"setup": setup}) == ClientStep(model=model)
    proto.model_changed(model or "")
    client(proto, {"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hi"}]}], "turnComplete": True}})
    call = client(proto, {"clientContent": {"turnComplete": True}}).call
    assert call is not None and call.max_output_tokens == max_output and call.limit is None


@pytest.mark.parametrize(
    "event, calls",
    [
        ({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "a"}]}], "turnComplete": True}}, True),
        ({"client_content": {"turns": [{"role": "user", "parts": [{"text": "a"}]}], "turn_complete": True}}, True),
        ({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "a"}]}]}}, False),  # more to come
        ({"realtimeInput": {"text": "hello"}}, True),
        ({"realtime_input": {"text": "hello"}}, True),
        ({"realtimeInput": {"audio": {"data": "AAAA", "mimeType": "audio/pcm;rate=16000"}}}, False),
        ({"realtimeInput": {"audioStreamEnd": True}}, True),
        ({"realtimeInput": {"activityEnd": {}}}, True),
        ({"realtimeInput": {"activityStart": {}}}, False),
        ({"toolResponse": {"functionResponses": [{"id": "1", "name": "f", "response": {"ok": True}}]}}, True),
        ({"tool_response": {"functionResponses": []}}, True),
        ({"somethingElse": {}}, False),
        ({"clientContent": "not an object"}, False),
    ],
)
def test_live_client_messages(event: dict[str, Any], calls: bool) -> None:
    proto = LiveSocket("gemini-live-2.5-flash-preview")
    step = client(proto, event)
    assert (step.call is not None) is calls
    if step.call is not None:
        assert step.call.kind is K.REALTIME and step.call.model == "gemini-live-2.5-flash-preview"
        assert step.call.body["model"] == "gemini-live-2.5-flash-preview"


def test_live_turns_accumulate_with_the_model_s_answers_and_the_system_instruction() -> None:
    proto = LiveSocket(None)
    client(proto, {"setup": {"model": "models/m", "systemInstruction": {"parts": [{"text": "Be nice"}]}}})
    proto.model_changed("m")
    client(proto, {"clientContent": {"turns": [{"role": "user", "parts": [{"text": "first"}]}], "turnComplete": True}})
    proto.from_server({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": "answer"}]}}})
    call = client(proto, {"realtimeInput": {"text": "second"}}).call
    assert call is not None
    assert call.body["systemInstruction"] == {"parts": [{"text": "Be nice"}]}
    assert [t["parts"][0]["text"] for t in call.body["contents"]] == ["first", "answer", "second"]


def test_live_remembers_at_most_the_context_limit() -> None:
    proto = LiveSocket("m")
    for i in range(400):
        client(proto, {"clientContent": {"turns": [{"role": "user", "parts": [{"text": str(i)}]}]}})
    call = client(proto, {"realtimeInput": {"text": "last"}}).call
    assert call is not None and 200 <= len(call.body["contents"]) <= 257


LIVE_USAGE = {"promptTokenCount": 12, "responseTokenCount": 5, "totalTokenCount": 17}


def test_live_server_messages_end_a_turn_with_its_usage() -> None:
    proto = LiveSocket("gemini-live-2.5-flash-preview")
    assert proto.from_server({"setupComplete": {}}) == ServerStep()
    assert proto.from_server({"serverContent": {"modelTurn": {"parts": [{"text": "Hel"}]}}}) == ServerStep(
        output=True, text="Hel")
    assert proto.from_server({"usageMetadata": LIVE_USAGE}) == ServerStep()  # usage may come before the end
    done = proto.from_server({"serverContent": {"turnComplete": True}})
    assert done == ServerStep(done={"usageMetadata": LIVE_USAGE, "modelVersion": "gemini-live-2.5-flash-preview"})
    # The same message may carry the usage and the end; the next turn does not inherit the last usage.
    both = proto.from_server({"serverContent": {"turnComplete": True}, "usageMetadata": LIVE_USAGE})
    assert both.done == {"usageMetadata": LIVE_USAGE, "modelVersion": "gemini-live-2.5-flash-preview"}
    assert proto.from_server({"serverContent": {"turnComplete": True}}) == ServerStep(done={})


@pytest.mark.parametrize("event", [{"serverContent": {"interrupted": True}}, {"goAway": {"timeLeft": "5s"}},
                                   {"toolCall": {"functionCalls": []}}, {"serverContent": "x"}])
def test_live_messages_that_end_nothing(event: dict[str, Any]) -> None:
    assert LiveSocket("m").from_server(event).done is None


def test_live_has_no_error_event() -> None:
    assert LiveSocket("m").error_event(429, "spendgate_budget_exceeded", "Cap reached.") is None
