"""spendgate.providers.sockets: the OpenAI Realtime API (GA and the `realtime=v1` beta), message by
message: what a session and its client events ask the model for, and what the server's events say
about a call. Events shaped as OpenAI documents them. The other protocols are in test_sockets.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from spendgate.providers.sockets import ClientStep, RealtimeSocket, ServerStep
from tests.unit.providers.test_sockets import K, client

# --- Realtime ---------------------------------------------------------------------------------------------


def user_item(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


@pytest.mark.parametrize(
    "session, step, instructions, max_output",
    [
        ({"type": "realtime", "model": "gpt-realtime"}, ClientStep(), None, None),  # the socket's own model
        ({"type": "realtime", "model": "gpt-4o-realtime-preview"}, ClientStep(model="gpt-4o-realtime-preview"),
         None, None),
        ({"instructions": "Be brief.", "max_output_tokens": 200}, ClientStep(), "Be brief.", 200),
        ({"max_response_output_tokens": 300}, ClientStep(), None, 300),  # the beta's name
        ({"max_response_output_tokens": "inf"}, ClientStep(), None, None),  # no limit
        ({"model": ""}, ClientStep(), None, None),
    ],
)
def test_realtime_session_update(session: dict[str, Any], step: ClientStep, instructions: object,
                                 max_output: int | None) -> None:
    proto = RealtimeSocket("gpt-realtime", beta=False)
    assert client(proto, {"type": "session.update", "session": session}) == step
    assert proto.model == "gpt-realtime"  # the stage changes it once the allow-list agrees
    assert (proto.instructions, proto.max_output) == (instructions, max_output)


def test_realtime_model_change_is_the_model_of_the_next_call() -> None:
    proto = RealtimeSocket("gpt-realtime", beta=False)
    step = client(proto, {"type": "session.update", "session": {"model": "gpt-realtime-mini"}})
    assert step.model == "gpt-realtime-mini"
    proto.model_changed("gpt-realtime-mini")
    call = client(proto, {"type": "response.create"}).call
    assert call is not None and call.model == "gpt-realtime-mini" and call.body["model"] == "gpt-realtime-mini"


def test_realtime_response_create_counts_the_conversation_so_far() -> None:
    proto = RealtimeSocket("gpt-realtime", beta=False)
    client(proto, {"type": "session.update", "session": {"instructions": "Be brief.", "max_output_tokens": 200}})
    client(proto, user_item("Hello"))
    proto.from_server({"type": "conversation.item.done", "item": {"role": "assistant", "content": [
        {"type": "output_text", "text": "Hi there"}]}})
    proto.from_server({"type": "conversation.item.added", "item": {"role": "assistant", "content": "partial"}})
    client(proto, user_item("And again"))
    step = client(proto, {"type": "response.create", "event_id": "evt_7"})
    call = step.call
    assert call is not None and call.kind is K.REALTIME and call.client_event_id == "evt_7"
    assert call.max_output_tokens == 200
    assert call.body["instructions"] == "Be brief."
    texts = json.dumps(call.body["input"])
    assert "Hello" in texts and "Hi there" in texts and "And again" in texts and "partial" not in texts


@pytest.mark.parametrize(
    "response, limit, instructions, n_items",
    [
        ({}, None, None, 2),
        ({"max_output_tokens": 50}, 50, None, 2),
        ({"max_response_output_tokens": 60}, 60, None, 2),
        ({"max_output_tokens": "inf"}, None, None, 2),  # the response's own "no limit" wins over the session's
        ({"instructions": "Shout."}, None, "Shout.", 2),
        ({"input": [{"type": "message", "role": "user", "content": "extra"}]}, None, None, 3),
        # Out of band: only its own input, not the conversation.
        ({"conversation": "none", "input": [{"type": "message", "role": "user", "content": "solo"}]}, None, None, 1),
    ],
)
def test_realtime_response_options(response: dict[str, Any], limit: int | None, instructions: object,
                                   n_items: int) -> None:
    proto = RealtimeSocket("gpt-realtime", beta=False)
    client(proto, user_item("one"))
    client(proto, user_item("two"))
    call = client(proto, {"type": "response.create", "response": response}).call
    assert call is not None
    assert (call.max_output_tokens, call.body["instructions"], len(call.body["input"])) == (
        limit, instructions, n_items)


def test_realtime_response_limit_beats_the_session_s() -> None:
    proto = RealtimeSocket("gpt-realtime", beta=True)
    client(proto, {"type": "session.update", "session": {"max_response_output_tokens": 4096}})
    assert (c := client(proto, {"type": "response.create"}).call) is not None and c.max_output_tokens == 4096
    assert (c := client(proto, {"type": "response.create", "response": {"max_output_tokens": 10}}).call) is not None
    assert c.max_output_tokens == 10


@pytest.mark.parametrize("response, key", [
    ({}, "max_output_tokens"), ({"max_output_tokens": 4000}, "max_output_tokens"),
    ({"max_response_output_tokens": 4000}, "max_response_output_tokens"),
])
def test_realtime_limit_rewrites_the_response_s_field(response: dict[str, Any], key: str) -> None:
    event = {"type": "response.create", "event_id": "evt_1", "response": {**response, "metadata": {"a": "b"}}}
    call = client(RealtimeSocket("gpt-realtime", beta=False), event).call
    assert call is not None and call.limit is not None
    assert json.loads(call.limit(128)) == {**event, "response": {**event["response"], key: 128}}


def test_realtime_committed_audio_counts_as_input_until_the_response_is_done() -> None:
    proto = RealtimeSocket("gpt-realtime", beta=False)
    second = "A" * 64_000  # 48,000 bytes of PCM: one second at 24 kHz
    for _ in range(10):
        client(proto, {"type": "input_audio_buffer.append", "audio": second})
    client(proto, {"type": "input_audio_buffer.append", "audio": 123})  # not audio: ignored
    assert proto.audio_bytes == 480_000
    call = client(proto, {"type": "response.create"}).call
    assert call is not None
    audio = call.body["input"][-1]
    assert audio["type"] == "input_text" and audio["text"] == "x " * 200  # 480,000 bytes / 2400 a token
    proto.from_server({"type": "response.done", "response": {"id": "r", "status": "completed"}})
    assert proto.audio_bytes == 0
    after = client(proto, {"type": "response.create"}).call
    assert after is not None and after.body["input"] == []


REALTIME_USAGE = {"total_tokens": 70, "input_tokens": 50, "output_tokens": 20,
                  "input_token_details": {"text_tokens": 30, "audio_tokens": 20, "cached_tokens": 10},
                  "output_token_details": {"text_tokens": 5, "audio_tokens": 15}}


@pytest.mark.parametrize(
    "event, step",
    [
        ({"type": "session.created", "session": {}}, ServerStep()),
        ({"type": "response.created", "response": {"id": "resp_9", "status": "in_progress"}},
         ServerStep(response_id="resp_9")),
        ({"type": "response.output_text.delta", "delta": "x"}, ServerStep(output=True, text="x")),
        ({"type": "response.output_audio.delta", "delta": "AAAA"}, ServerStep(output=True)),  # audio: not text
        ({"type": "response.text.delta", "delta": "x"}, ServerStep(output=True, text="x")),  # beta names
        ({"type": "response.done", "response": {"id": "resp_9", "status": "completed", "usage": REALTIME_USAGE}},
         ServerStep(response_id="resp_9", done={"id": "resp_9", "status": "completed", "usage": REALTIME_USAGE,
                                                "model": "gpt-realtime"})),
        ({"type": "response.done", "response": {"id": "resp_9", "status": "cancelled", "usage": REALTIME_USAGE}},
         ServerStep(response_id="resp_9", done={"id": "resp_9", "status": "cancelled", "usage": REALTIME_USAGE,
                                                "model": "gpt-realtime"})),
        ({"type": "response.done", "response": {"id": "resp_9", "status": "failed", "status_details": {
            "error": {"message": "overloaded"}}}},
         ServerStep(response_id="resp_9", status=500, error="response failed: overloaded", done={
             "id": "resp_9", "status": "failed", "status_details": {"error": {"message": "overloaded"}},
             "model": "gpt-realtime"})),
        # An error answering a client event ends that event's call; one without names none.
        ({"type": "error", "error": {"code": "invalid_value", "message": "bad", "event_id": "evt_3"}},
         ServerStep(done={}, status=400, client_event_id="evt_3", error="upstream error: bad")),
        ({"type": "error", "error": {"code": "session_expired", "message": "gone"}},
         ServerStep(status=400, error="upstream error: gone")),
        ({"type": 3}, ServerStep()),
    ],
)
def test_realtime_server_events(event: dict[str, Any], step: ServerStep) -> None:
    assert RealtimeSocket("gpt-realtime", beta=False).from_server(event) == step


def test_realtime_error_event_is_realtime_shaped() -> None:
    raw = RealtimeSocket(None, beta=False).error_event(429, "spendgate_budget_exceeded", "Cap reached.", "evt_2")
    assert raw is not None
    assert json.loads(raw) == {"type": "error", "event_id": "event_spendgate", "error": {
        "type": "invalid_request_error", "code": "spendgate_budget_exceeded", "message": "Cap reached.",
        "param": None, "event_id": "evt_2"}}
