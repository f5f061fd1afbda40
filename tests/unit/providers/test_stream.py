"""spendgate.providers.stream: a `StreamTap` reads a streamed answer as it passes (SSE, or Gemini's
JSON array), forwards it byte for byte, and, when the gateway itself asked the stream for its usage,
gives the client exactly the stream it would have got without asking."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.providers import adapter_for
from spendgate.providers.base import OUTPUT_TEXT_LIMIT
from spendgate.providers.stream import StreamTap
from spendgate.providers.wire import EndpointKind, Family, Usage

F, K = Family, EndpointKind


def tap_for(family: Family, kind: EndpointKind, content_type: str = "text/event-stream",
            strip: bool = False) -> StreamTap:
    """The tap the Meter stage makes: the framing from the response's content type, and `strip`
    when `prepare_stream` changed the request."""
    adapter = adapter_for(family)
    fmt = adapter.stream_format(content_type, True)
    assert fmt is not None
    return StreamTap(adapter, kind, fmt, strip_added_usage=strip)


def sse(*objs: object, done: bool = False, eol: str = "\n") -> bytes:
    out = ""
    for o in objs:
        if isinstance(o, tuple):
            name, payload = o
            out += f"event: {name}{eol}data: {json.dumps(payload, separators=(',', ':'))}{eol}{eol}"
        else:
            out += f"data: {json.dumps(o, separators=(',', ':'))}{eol}{eol}"
    if done:
        out += f"data: [DONE]{eol}{eol}"
    return out.encode()


def feed_all(tap: StreamTap, stream: bytes, size: int = 0) -> bytes:
    out = b""
    step = size or len(stream) or 1
    for i in range(0, len(stream), step):
        out += tap.feed(stream[i : i + step])
    return out + tap.feed(b"")


ENVELOPE = (
    '"id":"chatcmpl-C42qMU7","object":"chat.completion.chunk","created":1755080278,'
    '"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54111",'
)
USAGE_JSON = (
    '{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    '"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}'
)
CHOICES = [
    '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]',
    '[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]',
    '[{"index":0,"delta":{"content":" \\"usage\\":null, world"},"logprobs":null,"finish_reason":null}]',
    '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]',
]


def openai_stream(include_usage: bool, eol: str = "\n", obfuscation: bool = True) -> bytes:
    """The bytes OpenAI sends for one completion, with or without include_usage."""
    events = []
    for i, choices in enumerate(CHOICES):
        tail = ',"usage":null' if include_usage else ""
        if obfuscation:
            tail += f',"obfuscation":"pad{i}"'
        events.append("data: {" + ENVELOPE + '"choices":' + choices + tail + "}")
    if include_usage:
        tail = ',"obfuscation":"padU"' if obfuscation else ""
        events.append("data: {" + ENVELOPE + '"choices":[],"usage":' + USAGE_JSON + tail + "}")
    events.append("data: [DONE]")
    return "".join(e + eol + eol for e in events).encode()


# --- OpenAI chat / completions ---------------------------------------------------------------------


def test_openai_chat_stream_usage() -> None:
    tap = tap_for(F.OPENAI, K.CHAT)
    stream = openai_stream(include_usage=True)
    assert feed_all(tap, stream, 13) == stream
    assert tap.completed
    assert tap.usage == Usage(19, 10, 0, 0, 0, "gpt-4o-mini-2024-07-18", "chatcmpl-C42qMU7")
    assert tap.output_text == 'Hello "usage":null, world'
    assert tap.output_text_bytes >= len(tap.output_text.encode())  # undecoded events count whole


def test_openai_stream_without_usage_and_cut_off() -> None:
    tap = tap_for(F.OPENAI, K.CHAT)
    stream = openai_stream(include_usage=False)
    tap.feed(stream[: stream.index(b"[DONE]")])
    assert not tap.completed
    assert tap.usage is None
    assert tap.output_text.startswith("Hello")


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("obfuscation", [True, False])
@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_strip_gives_client_what_it_would_have_got(eol: str, obfuscation: bool, size: int) -> None:
    tap = tap_for(F.OPENAI, K.CHAT, strip=True)
    got = feed_all(tap, openai_stream(True, eol, obfuscation), size)
    assert got == openai_stream(False, eol, obfuscation)
    assert tap.usage is not None and tap.usage.input_tokens == 19
    assert tap.completed
    # the text that merely looks like the span, inside a string, was left alone
    assert b'\\"usage\\":null, world' in got


@given(st.data())
def test_strip_under_any_chunking(data: st.DataObject) -> None:
    eol = data.draw(st.sampled_from(["\n", "\r\n", "\r"]))
    stream = openai_stream(True, eol)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20))))
    tap = tap_for(F.OPENAI, K.CHAT, strip=True)
    out, prev = b"", 0
    for c in [*cuts, len(stream)]:
        out += tap.feed(stream[prev:c])  # never b"": that means end of stream
        prev = c
    out += tap.feed(b"")
    assert out == openai_stream(False, eol)
    assert tap.usage is not None and tap.usage.output_tokens == 10


def test_strip_holds_back_at_most_the_unfinished_event() -> None:
    tap = tap_for(F.OPENAI, K.CHAT, strip=True)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    # a complete event goes out at once, an unfinished one waits
    assert tap.feed(first + b"data: {\"cho") == b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    assert tap.feed(b'ices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n') == b""
    assert tap.feed(b": keep-alive\n\ndata: [DONE]\n\n") == b": keep-alive\n\ndata: [DONE]\n\n"
    assert tap.usage == Usage(1, 2)
    assert tap.feed(b"data: trailing, never terminated") == b""
    assert tap.feed(b"") == b"data: trailing, never terminated"


@pytest.mark.parametrize("cut", range(1, 120, 3))
def test_empty_chunk_mid_event_keeps_the_stream_valid(cut: int) -> None:
    # mitmproxy passes b"" at end of stream; an empty HTTP/2 DATA frame mid-stream looks the
    # same. The held half-event is released, and the rest of it then follows verbatim.
    stream = openai_stream(True)
    usage_at = stream.index(b'data: {"id"', stream.index(b'"finish_reason":"stop"'))
    tap = tap_for(F.OPENAI, K.CHAT, strip=True)
    out = tap.feed(stream[: usage_at + cut]) + tap.feed(b"") + tap.feed(stream[usage_at + cut :])
    before_usage = openai_stream(False)[: -len(b"data: [DONE]\n\n")]
    assert out + tap.feed(b"") == before_usage + stream[usage_at:]
    assert tap.usage is not None and tap.completed


def test_strip_is_only_for_sse() -> None:
    # The gateway asks for usage only where `prepare_stream` says so (OpenAI chat / completions,
    # see test_adapters.py); a tap strips only what it can frame event by event.
    assert tap_for(F.OPENAI, K.COMPLETIONS, strip=True).strip
    assert not tap_for(F.OPENAI, K.CHAT).strip
    assert not tap_for(F.GEMINI, K.CHAT, "application/json", strip=True).strip


def test_strip_legacy_completions() -> None:
    tap = tap_for(F.OPENAI, K.COMPLETIONS, strip=True)
    stream = sse(
        {"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "Hi", "index": 0}], "usage": None},
        {"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
        done=True,
    )
    out = feed_all(tap, stream, 5)
    assert out == sse({"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "Hi", "index": 0}]},
                      done=True)
    assert tap.usage == Usage(4, 1, model_reported="gpt-3.5-turbo-instruct", upstream_request_id="cmpl-1")
    assert tap.output_text == "Hi"


def test_observe_only_forwards_chunks_unchanged() -> None:
    tap = tap_for(F.OPENAI, K.CHAT)
    chunk = b"data: {not json\n\ndata: [1,2]\n\n: hi\n\n\xff\xfe"
    assert tap.feed(chunk) is chunk
    assert tap.usage is None


def test_output_text_is_bounded_but_counted() -> None:
    tap = tap_for(F.OPENAI, K.CHAT)
    piece = "é" * 1000  # 2000 bytes
    stream = sse(*({"choices": [{"delta": {"content": piece}}]} for _ in range(50)))
    tap.feed(stream)
    assert tap.output_text_bytes >= 100_000
    assert len(tap.output_text.encode()) <= OUTPUT_TEXT_LIMIT
    assert len(tap.output_text.encode()) > OUTPUT_TEXT_LIMIT - 4


# --- OpenAI responses ------------------------------------------------------------------------------

RESPONSES_STREAM = sse(
    ("response.created", {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "status": "in_progress", "model": "gpt-4.1-2025-04-14", "usage": None}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1",
                                    "output_index": 0, "content_index": 0, "delta": "Hi"}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "delta": "{}"}),
    ("response.output_text.done", {"type": "response.output_text.done", "text": "Hi"}),
    ("response.completed", {"type": "response.completed", "sequence_number": 9, "response": {
        "id": "resp_1", "status": "completed", "model": "gpt-4.1-2025-04-14", "usage": {
            "input_tokens": 37, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 11,
            "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 48}}}),
)


def test_responses_stream() -> None:
    tap = tap_for(F.OPENAI, K.RESPONSES)
    assert feed_all(tap, RESPONSES_STREAM, 11) == RESPONSES_STREAM
    assert tap.completed
    assert tap.usage == Usage(37, 11, 0, 0, 3, "gpt-4.1-2025-04-14", "resp_1")
    assert tap.output_text == "Hi{}"


def test_responses_incomplete_is_a_proper_end() -> None:
    tap = tap_for(F.OPENAI, K.RESPONSES)
    tap.feed(sse(("response.incomplete", {"type": "response.incomplete",
                                          "response": {"usage": {"input_tokens": 5, "output_tokens": 16}}})))
    assert tap.completed and tap.usage == Usage(5, 16)


# --- Anthropic ---------------------------------------------------------------------------------------

ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 100,
                                       "cache_read_input_tokens": 2000, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": " hmm"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}),
    ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
)


def test_anthropic_stream() -> None:
    tap = tap_for(F.ANTHROPIC, K.MESSAGES)
    assert feed_all(tap, ANTHROPIC_STREAM, 9) == ANTHROPIC_STREAM
    assert tap.completed
    assert tap.usage == Usage(2125, 15, 2000, 100, 0, "claude-sonnet-4-5-20250929", "msg_01")
    assert tap.output_text == 'Hello hmm{"a":'


def test_anthropic_stream_cut_off_keeps_input_usage() -> None:
    tap = tap_for(F.ANTHROPIC, K.MESSAGES)
    tap.feed(ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")])
    assert not tap.completed
    assert tap.usage is not None
    assert (tap.usage.input_tokens, tap.usage.output_tokens) == (2125, 1)


# --- Gemini: SSE with ?alt=sse, else one JSON array ----------------------------------------------------


def gemini_chunks() -> list[dict[str, Any]]:
    return [
        {"candidates": [{"content": {"parts": [{"text": "He said \"}]{\" \\ ok"}], "role": "model"}, "index": 0}],
         "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}, "modelVersion": "gemini-2.5-flash",
         "responseId": "r1"},
        {"candidates": [{"content": {"parts": [{"text": " wörld"}], "role": "model"}, "finishReason": "STOP",
                         "index": 0}],
         "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 25,
                           "totalTokenCount": 40},
         "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
    ]


def test_gemini_sse_stream() -> None:
    tap = tap_for(F.GEMINI, K.CHAT)
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in gemini_chunks())
    assert feed_all(tap, stream, 3) == stream
    assert tap.completed
    assert tap.usage == Usage(10, 30, 0, 0, 25, "gemini-2.5-flash", "r1")
    assert tap.output_text == 'He said "}]{" \\ ok wörld'


@given(st.data())
def test_gemini_json_array_stream(data: st.DataObject) -> None:
    # Without ?alt=sse Gemini streams one pretty-printed JSON array (content type application/json).
    stream = ("[" + "\n,\r\n".join(json.dumps(c, indent=2) for c in gemini_chunks()) + "\n]").encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=25)))
    tap = tap_for(F.GEMINI, K.CHAT, "application/json; charset=UTF-8")
    out, prev = b"", 0
    for c in [*cuts, len(stream)]:
        out += tap.feed(stream[prev:c])
        prev = c
    assert out == stream
    assert tap.completed
    assert tap.usage == Usage(10, 30, 0, 0, 25, "gemini-2.5-flash", "r1")
    assert tap.output_text == 'He said "}]{" \\ ok wörld'


def test_tap_survives_hostile_json() -> None:
    tap = tap_for(F.OPENAI, K.CHAT)
    chunk = b"data: {" + b'"a":[' * 50_000 + b"\n\n"
    assert tap.feed(chunk) is chunk
    gem = tap_for(F.GEMINI, K.CHAT, "application/json")
    chunk = b"[{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}]"
    assert gem.feed(chunk) is chunk


# --- only what can carry usage is decoded ---------------------------------------------------------


class _Counting:
    """An adapter that counts the events it is handed decoded."""

    def __init__(self, family: Family) -> None:
        self.inner = adapter_for(family)
        self.observed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def observe(self, kind: EndpointKind, event: Any, state: Any) -> None:
        self.observed += 1
        self.inner.observe(kind, event, state)


@pytest.mark.parametrize("family, kind, stream, decoded", [
    (Family.OPENAI, EndpointKind.CHAT, sse(*({"id": "c1", "model": "m", "choices": [{"delta": {"content": "x"}}],
                                               "usage": None} for _ in range(100)),
                                           {"id": "c1", "model": "m", "choices": [], "usage": {
                                               "prompt_tokens": 3, "completion_tokens": 100}}, done=True), 2),
    (Family.ANTHROPIC, EndpointKind.MESSAGES, sse(
        ("message_start", {"type": "message_start", "message": {"id": "msg", "model": "claude",
                                                                 "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "x"}}) for _ in range(100)),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 100}}),
        ("message_stop", {"type": "message_stop"})), 3),
])
def test_text_only_events_are_not_decoded_unless_the_output_must_be_estimated(
        family: Family, kind: EndpointKind, stream: bytes, decoded: int) -> None:
    adapter = _Counting(family)
    tap = StreamTap(adapter, kind, adapter.inner.stream_format("text/event-stream", True))  # type: ignore[arg-type]
    assert tap.feed(stream) == stream
    assert tap.completed and tap.usage is not None and tap.usage.output_tokens == 100
    assert adapter.observed == decoded  # the first event, and those that can carry usage or the end
    assert tap.output_text == "x" * 100  # decoded only now, when asked
