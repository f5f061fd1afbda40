from __future__ import annotations

import json
from typing import Any

import genai_prices
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.usage import (
    OUTPUT_TEXT_LIMIT,
    EndpointKind,
    Family,
    RequestFacts,
    StreamTap,
    Usage,
    add_include_usage,
    endpoint_kind_for,
    request_facts,
    usage_from_json,
)

F, K = Family, EndpointKind

# --- non-streamed bodies, shaped as the providers send them ----------------------------------

OPENAI_CHAT = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
    },
}
OPENAI_RESPONSES = {
    "id": "resp_1",
    "object": "response",
    "model": "o3-2025-04-16",
    "usage": {
        "input_tokens": 500,
        "input_tokens_details": {"cached_tokens": 200},
        "output_tokens": 900,
        "output_tokens_details": {"reasoning_tokens": 700},
        "total_tokens": 1400,
    },
}
OPENAI_EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
ANTHROPIC_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "hi"}],
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 300,
    },
}
GEMINI_RESPONSE = {
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
    "usageMetadata": {
        "promptTokenCount": 1500,
        "candidatesTokenCount": 200,
        "totalTokenCount": 1800,
        "cachedContentTokenCount": 1000,
        "thoughtsTokenCount": 100,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1500}],
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "r-1",
}


@pytest.mark.parametrize(
    "family, kind, body, expected",
    [
        (F.OPENAI, K.CHAT, OPENAI_CHAT, Usage(1200, 300, 1024, 0, 128, "gpt-4o-2024-08-06", "chatcmpl-abc")),
        (F.OPENAI, K.RESPONSES, OPENAI_RESPONSES, Usage(500, 900, 200, 0, 700, "o3-2025-04-16", "resp_1")),
        (F.OPENAI, K.EMBEDDINGS, OPENAI_EMBEDDINGS, Usage(8, 0, 0, 0, 0, "text-embedding-3-small", None)),
        (
            F.ANTHROPIC,
            K.MESSAGES,
            ANTHROPIC_MESSAGE,
            Usage(3050, 300, 2000, 1000, 0, "claude-sonnet-4-5-20250929", "msg_01"),
        ),
        (F.GEMINI, K.CHAT, GEMINI_RESPONSE, Usage(1500, 300, 1000, 0, 100, "gemini-2.5-flash", "r-1")),
        (
            F.OPENAI,
            K.CHAT,
            {"model": "deepseek-chat", "usage": {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}},
            Usage(100, 5, 64, 0, 0, "deepseek-chat", None),
        ),
        (F.OPENAI, K.CHAT, {"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}}, Usage(3, 4)),
        (F.OPENAI, K.CHAT, {"choices": []}, None),
        (F.OPENAI, K.CHAT, {"usage": None}, None),
        (F.ANTHROPIC, K.OTHER, {"input_tokens": 12}, None),  # count_tokens answers are free
        (F.GEMINI, K.CHAT, {"candidates": []}, None),
        (F.OPENAI, K.CHAT, {"usage": {"prompt_tokens": True, "completion_tokens": -3}}, Usage()),
    ],
)
def test_usage_from_json(family: Family, kind: EndpointKind, body: dict[str, Any], expected: Usage | None) -> None:
    assert usage_from_json(family, kind, body) == expected


@pytest.mark.parametrize(
    "family, kind, body, provider_id, flavor",
    [
        (F.OPENAI, K.CHAT, OPENAI_CHAT, "openai", "chat"),
        (F.OPENAI, K.RESPONSES, OPENAI_RESPONSES, "openai", "responses"),
        (F.OPENAI, K.EMBEDDINGS, OPENAI_EMBEDDINGS, "openai", "embeddings"),
        (F.ANTHROPIC, K.MESSAGES, ANTHROPIC_MESSAGE, "anthropic", "default"),
        (F.GEMINI, K.CHAT, GEMINI_RESPONSE, "google", "default"),
    ],
)
def test_agrees_with_genai_prices_extract_usage(
    family: Family, kind: EndpointKind, body: dict[str, Any], provider_id: str, flavor: str
) -> None:
    ours = usage_from_json(family, kind, body)
    theirs = genai_prices.extract_usage(body, provider_id=provider_id, api_flavor=flavor).usage
    assert ours is not None
    assert ours.input_tokens == theirs.reported_value("input_tokens")
    assert ours.output_tokens == theirs.reported_value("output_tokens")
    assert ours.cache_read_tokens == theirs.reported_value("cache_read_tokens")
    assert ours.cache_write_tokens == theirs.reported_value("cache_write_tokens")
    assert ours.reasoning_tokens == theirs.reported_value("output_reasoning_tokens")


# --- streams ---------------------------------------------------------------------------------


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


def test_openai_chat_stream_usage() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT)
    stream = openai_stream(include_usage=True)
    assert feed_all(tap, stream, 13) == stream
    assert tap.completed
    assert tap.usage == Usage(19, 10, 0, 0, 0, "gpt-4o-mini-2024-07-18", "chatcmpl-C42qMU7")
    assert tap.output_text == 'Hello "usage":null, world'
    assert tap.output_text_bytes == len(tap.output_text.encode())


def test_openai_stream_without_usage_and_cut_off() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT)
    stream = openai_stream(include_usage=False)
    tap.feed(stream[: stream.index(b"[DONE]")])
    assert not tap.completed
    assert tap.usage is None
    assert tap.output_text.startswith("Hello")


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("obfuscation", [True, False])
@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_strip_gives_client_what_it_would_have_got(eol: str, obfuscation: bool, size: int) -> None:
    tap = StreamTap(F.OPENAI, K.CHAT, strip_usage_chunk=True)
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
    tap = StreamTap(F.OPENAI, K.CHAT, strip_usage_chunk=True)
    out, prev = b"", 0
    for c in [*cuts, len(stream)]:
        out += tap.feed(stream[prev:c])  # never b"": that means end of stream
        prev = c
    out += tap.feed(b"")
    assert out == openai_stream(False, eol)
    assert tap.usage is not None and tap.usage.output_tokens == 10


def test_strip_holds_back_at_most_the_unfinished_event() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT, strip_usage_chunk=True)
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
    tap = StreamTap(F.OPENAI, K.CHAT, strip_usage_chunk=True)
    out = tap.feed(stream[: usage_at + cut]) + tap.feed(b"") + tap.feed(stream[usage_at + cut :])
    before_usage = openai_stream(False)[: -len(b"data: [DONE]\n\n")]
    assert out + tap.feed(b"") == before_usage + stream[usage_at:]
    assert tap.usage is not None and tap.completed


def test_strip_is_only_for_openai_chat_and_completions() -> None:
    assert not StreamTap(F.ANTHROPIC, K.MESSAGES, strip_usage_chunk=True).strip
    assert not StreamTap(F.OPENAI, K.RESPONSES, strip_usage_chunk=True).strip
    assert StreamTap(F.OPENAI, K.COMPLETIONS, strip_usage_chunk=True).strip


def test_strip_legacy_completions() -> None:
    tap = StreamTap(F.OPENAI, K.COMPLETIONS, strip_usage_chunk=True)
    stream = sse(
        {"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "Hi", "index": 0}], "usage": None},
        {"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
        done=True,
    )
    out = feed_all(tap, stream, 5)
    assert out == sse({"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "Hi", "index": 0}]}, done=True)
    assert tap.usage == Usage(4, 1, model_reported="gpt-3.5-turbo-instruct", upstream_request_id="cmpl-1")
    assert tap.output_text == "Hi"


def test_observe_only_forwards_chunks_unchanged() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT)
    chunk = b"data: {not json\n\ndata: [1,2]\n\n: hi\n\n\xff\xfe"
    assert tap.feed(chunk) is chunk
    assert tap.usage is None


ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": None, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " hmm"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}),
    ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
)


def test_anthropic_stream() -> None:
    tap = StreamTap(F.ANTHROPIC, K.MESSAGES)
    assert feed_all(tap, ANTHROPIC_STREAM, 9) == ANTHROPIC_STREAM
    assert tap.completed
    assert tap.usage == Usage(2125, 15, 2000, 100, 0, "claude-sonnet-4-5-20250929", "msg_01")
    assert tap.output_text == 'Hello hmm{"a":'


def test_anthropic_stream_cut_off_keeps_input_usage() -> None:
    tap = StreamTap(F.ANTHROPIC, K.MESSAGES)
    tap.feed(ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")])
    assert not tap.completed
    assert tap.usage is not None
    assert (tap.usage.input_tokens, tap.usage.output_tokens) == (2125, 1)


def gemini_chunks() -> list[dict[str, Any]]:
    return [
        {"candidates": [{"content": {"parts": [{"text": "He said \"}]{\" \\ ok"}], "role": "model"}, "index": 0}], "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}, "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
        {"candidates": [{"content": {"parts": [{"text": " wörld"}], "role": "model"}, "finishReason": "STOP", "index": 0}], "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 25, "totalTokenCount": 40}, "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
    ]


def test_gemini_sse_stream() -> None:
    tap = StreamTap(F.GEMINI, K.CHAT)
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in gemini_chunks())
    assert feed_all(tap, stream, 3) == stream
    assert tap.completed
    assert tap.usage == Usage(10, 30, 0, 0, 25, "gemini-2.5-flash", "r1")
    assert tap.output_text == 'He said "}]{" \\ ok wörld'


@given(st.data())
def test_gemini_json_array_stream(data: st.DataObject) -> None:
    # Without ?alt=sse Gemini streams one pretty-printed JSON array.
    stream = ("[" + "\n,\r\n".join(json.dumps(c, indent=2) for c in gemini_chunks()) + "\n]").encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=25)))
    tap = StreamTap(F.GEMINI, K.CHAT)
    out, prev = b"", 0
    for c in [*cuts, len(stream)]:
        out += tap.feed(stream[prev:c])
        prev = c
    assert out == stream
    assert tap.completed
    assert tap.usage == Usage(10, 30, 0, 0, 25, "gemini-2.5-flash", "r1")
    assert tap.output_text == 'He said "}]{" \\ ok wörld'


RESPONSES_STREAM = sse(
    ("response.created", {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "status": "in_progress", "model": "gpt-4.1-2025-04-14", "usage": None}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "delta": "{}"}),
    ("response.output_text.done", {"type": "response.output_text.done", "text": "Hi"}),
    ("response.completed", {"type": "response.completed", "sequence_number": 9, "response": {"id": "resp_1", "status": "completed", "model": "gpt-4.1-2025-04-14", "usage": {"input_tokens": 37, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 11, "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 48}}}),
)


def test_responses_stream() -> None:
    tap = StreamTap(F.OPENAI, K.RESPONSES)
    assert feed_all(tap, RESPONSES_STREAM, 11) == RESPONSES_STREAM
    assert tap.completed
    assert tap.usage == Usage(37, 11, 0, 0, 3, "gpt-4.1-2025-04-14", "resp_1")
    assert tap.output_text == "Hi{}"


def test_responses_incomplete_is_a_proper_end() -> None:
    tap = StreamTap(F.OPENAI, K.RESPONSES)
    tap.feed(sse(("response.incomplete", {"type": "response.incomplete", "response": {"usage": {"input_tokens": 5, "output_tokens": 16}}})))
    assert tap.completed and tap.usage == Usage(5, 16)


def test_output_text_is_bounded_but_counted() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT)
    piece = "é" * 1000  # 2000 bytes
    stream = sse(*({"choices": [{"delta": {"content": piece}}]} for _ in range(50)))
    tap.feed(stream)
    assert tap.output_text_bytes == 100_000
    assert len(tap.output_text.encode()) <= OUTPUT_TEXT_LIMIT
    assert len(tap.output_text.encode()) > OUTPUT_TEXT_LIMIT - 4


# --- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, changed, after",
    [
        ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": True, "stream_options": None}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        (
            {"stream": True, "stream_options": {"include_obfuscation": False}},
            True,
            {"stream": True, "stream_options": {"include_obfuscation": False, "include_usage": True}},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": False}},
            True,
            {"stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": True}},
            False,
            {"stream": True, "stream_options": {"include_usage": True}},
        ),
        ({"stream": False}, False, {"stream": False}),
        ({}, False, {}),
    ],
)
def test_add_include_usage(body: dict[str, Any], changed: bool, after: dict[str, Any]) -> None:
    assert add_include_usage(body) is changed
    assert body == after


@pytest.mark.parametrize(
    "family, kind, body, path, expected",
    [
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": True, "max_tokens": 100}, "/v1/chat/completions", RequestFacts("gpt-4o", True, 100)),
        (F.OPENAI, K.CHAT, {"model": "o3", "max_completion_tokens": 5000}, "/v1/chat/completions", RequestFacts("o3", False, 5000)),
        (F.OPENAI, K.RESPONSES, {"model": "gpt-5", "max_output_tokens": 64, "stream": True}, "/v1/responses", RequestFacts("gpt-5", True, 64)),
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": "yes", "max_tokens": "9"}, "/v1/chat/completions", RequestFacts("gpt-4o", False, None)),
        (F.OPENAI, K.CHAT, None, "/v1/chat/completions", RequestFacts(None, False, None)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "claude-opus-4-1", "max_tokens": 1024, "stream": True}, "/v1/messages", RequestFacts("claude-opus-4-1", True, 1024)),
        (
            F.GEMINI,
            K.CHAT,
            {"generationConfig": {"maxOutputTokens": 256}},
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            RequestFacts("gemini-2.5-flash", True, 256),
        ),
        (F.GEMINI, K.CHAT, {}, "/v1/models/gemini-2.0-flash-001:generateContent", RequestFacts("gemini-2.0-flash-001", False, None)),
        (
            F.GEMINI,
            K.CHAT,
            {},
            "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:generateContent",
            RequestFacts("gemini-2.5-pro", False, None),
        ),
    ],
)
def test_request_facts(family: Family, kind: EndpointKind, body: dict[str, Any] | None, path: str, expected: RequestFacts) -> None:
    assert request_facts(family, kind, body, path) == expected


@pytest.mark.parametrize(
    "family, method, path, kind",
    [
        (F.OPENAI, "POST", "/v1/chat/completions", K.CHAT),
        (F.OPENAI, "POST", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", K.CHAT),
        (F.OPENAI, "POST", "/openai/v1/chat/completions", K.CHAT),  # groq
        (F.OPENAI, "POST", "/api/v1/chat/completions", K.CHAT),  # openrouter
        (F.OPENAI, "POST", "/v1/responses", K.RESPONSES),
        (F.OPENAI, "POST", "/v1/completions", K.COMPLETIONS),
        (F.OPENAI, "POST", "/v1/embeddings", K.EMBEDDINGS),
        (F.OPENAI, "POST", "/openai/deployments/emb/embeddings?api-version=1", K.EMBEDDINGS),
        (F.OPENAI, "GET", "/v1/responses/resp_123", K.OTHER),
        (F.OPENAI, "GET", "/v1/chat/completions", K.OTHER),
        (F.OPENAI, "GET", "/v1/models", K.OTHER),
        (F.OPENAI, "POST", "/v1/files", K.OTHER),
        (F.OPENAI, "POST", "/v1/responses/resp_1/cancel", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/messages", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages?beta=true", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages/count_tokens", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/messages/batches", K.OTHER),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", K.OTHER),
        (F.GEMINI, "POST", "/v1beta/models/text-embedding-004:embedContent", K.OTHER),
        (F.GEMINI, "GET", "/v1beta/models", K.OTHER),
    ],
)
def test_endpoint_kind_for(family: Family, method: str, path: str, kind: EndpointKind) -> None:
    assert endpoint_kind_for(family, method, path) is kind


def test_tap_survives_hostile_json() -> None:
    tap = StreamTap(F.OPENAI, K.CHAT)
    chunk = b"data: {" + b'"a":[' * 50_000 + b"\n\n"
    assert tap.feed(chunk) is chunk
    gem = StreamTap(F.GEMINI, K.CHAT)
    chunk = b"[{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}]"
    assert gem.feed(chunk) is chunk
