"""spendgate.providers.{openai,anthropic,gemini}: one adapter per wire family, one interface.

Each table row runs the family's adapter directly and through the `spendgate.usage` function
that dispatches to it, so a row shows both what the adapter reads and that callers get it.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from spendgate.providers import anthropic, gemini, openai
from spendgate.providers.base import OUTPUT_TEXT_LIMIT, StreamState, WireAdapter
from spendgate.usage import (
    EndpointKind,
    Family,
    RequestFacts,
    StreamTap,
    Usage,
    adapter_for,
    endpoint_kind_for,
    request_facts,
    usage_from_json,
)

F, K = Family, EndpointKind
MODULES = {F.OPENAI: openai, F.ANTHROPIC: anthropic, F.GEMINI: gemini}
INTERFACE = [name for name, _ in inspect.getmembers(WireAdapter, inspect.isfunction) if not name.startswith("_")]


# --- the interface ------------------------------------------------------------------------------


def test_interface_is_what_the_brief_lists() -> None:
    assert sorted(INTERFACE) == ["endpoint_kind", "observe", "request_facts", "usage", "usage_from_json"]


@pytest.mark.parametrize("family", list(Family))
def test_each_family_has_its_own_adapter_module(family: Family) -> None:
    adapter = adapter_for(family)
    assert adapter is MODULES[family].ADAPTER
    assert type(adapter).__module__ == f"spendgate.providers.{family.value}"
    assert adapter.family is family
    assert isinstance(adapter, WireAdapter)


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("method", INTERFACE)
def test_adapters_share_one_signature_per_method(family: Family, method: str) -> None:
    expected = list(inspect.signature(getattr(WireAdapter, method)).parameters.values())[1:]
    got = list(inspect.signature(getattr(adapter_for(family), method)).parameters.values())
    assert [(p.name, p.kind, p.annotation) for p in got] == [(p.name, p.kind, p.annotation) for p in expected]
    assert inspect.signature(getattr(adapter_for(family), method)).return_annotation == (
        inspect.signature(getattr(WireAdapter, method)).return_annotation
    )


def test_only_gemini_may_stream_a_json_array() -> None:
    assert {f: adapter_for(f).streams_json_array for f in Family} == {
        F.OPENAI: False,
        F.ANTHROPIC: False,
        F.GEMINI: True,
    }


# --- endpoint kind from method + path -----------------------------------------------------------


@pytest.mark.parametrize(
    "family, method, path, kind",
    [
        (F.OPENAI, "POST", "/v1/chat/completions", K.CHAT),
        (F.OPENAI, "post", "/v1/chat/completions/", K.CHAT),
        (F.OPENAI, "POST", "/v1/responses", K.RESPONSES),
        (F.OPENAI, "POST", "/v1/completions?x=1", K.COMPLETIONS),
        (F.OPENAI, "POST", "/v1/embeddings", K.EMBEDDINGS),
        (F.OPENAI, "POST", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", K.CHAT),
        (F.OPENAI, "GET", "/v1/responses/resp_1", K.OTHER),
        (F.OPENAI, "GET", "/v1/chat/completions", K.OTHER),
        (F.OPENAI, "POST", "/v1/files", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/messages", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages?beta=true", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages/count_tokens", K.OTHER),
        (F.ANTHROPIC, "GET", "/v1/messages", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/chat/completions", K.OTHER),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", K.OTHER),
        (F.GEMINI, "GET", "/v1beta/models/gemini-2.5-flash:generateContent", K.OTHER),
    ],
)
def test_endpoint_kind(family: Family, method: str, path: str, kind: EndpointKind) -> None:
    assert adapter_for(family).endpoint_kind(method, path) is kind
    assert endpoint_kind_for(family, method, path) is kind


# --- model / stream / max output tokens from the request ---------------------------------------


@pytest.mark.parametrize(
    "family, kind, body, path, facts",
    [
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": True, "max_completion_tokens": 64, "max_tokens": 9}, "/v1/chat/completions", RequestFacts("gpt-4o", True, 64)),
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "max_completion_tokens": None, "max_tokens": 9}, "/v1/chat/completions", RequestFacts("gpt-4o", False, 9)),
        (F.OPENAI, K.RESPONSES, {"model": "o3", "stream": "yes", "max_output_tokens": 100}, "/v1/responses", RequestFacts("o3", False, 100)),
        (F.OPENAI, K.EMBEDDINGS, {"model": "text-embedding-3-small", "input": "x"}, "/v1/embeddings", RequestFacts("text-embedding-3-small", False, None)),
        (F.OPENAI, K.CHAT, {"messages": [], "max_tokens": True}, "/openai/deployments/d/chat/completions", RequestFacts(None, False, None)),
        (F.OPENAI, K.CHAT, None, "/v1/chat/completions", RequestFacts(None, False, None)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 1024}, "/v1/messages", RequestFacts("claude-sonnet-4-5", True, 1024)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "", "max_tokens": "1024"}, "/v1/messages", RequestFacts(None, False, None)),
        (F.GEMINI, K.CHAT, {"generationConfig": {"maxOutputTokens": 256}}, "/v1beta/models/gemini-2.5-flash:generateContent", RequestFacts("gemini-2.5-flash", False, 256)),
        (F.GEMINI, K.CHAT, {"stream": True}, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", RequestFacts("gemini-2.5-pro", True, None)),
        (F.GEMINI, K.CHAT, {}, "/v1beta/tunedModels/my-tune:generateContent", RequestFacts("my-tune", False, None)),
        (F.GEMINI, K.CHAT, {"model": "gemini-x"}, "/v1beta/cachedContents", RequestFacts("gemini-x", False, None)),
    ],
)
def test_request_facts(
    family: Family, kind: EndpointKind, body: dict[str, Any] | None, path: str, facts: RequestFacts
) -> None:
    assert adapter_for(family).request_facts(kind, body or {}, path) == facts
    assert request_facts(family, kind, body, path) == facts


# --- usage from a JSON response -----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, kind, body, usage",
    [
        (
            F.OPENAI, K.CHAT,
            {"id": "chatcmpl-1", "model": "gpt-4o", "usage": {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 8}}},
            Usage(120, 30, 64, 0, 8, "gpt-4o", "chatcmpl-1"),
        ),
        (
            F.OPENAI, K.RESPONSES,
            {"id": "resp_1", "model": "o3", "usage": {"input_tokens": 50, "output_tokens": 90, "input_tokens_details": {"cached_tokens": 20}, "output_tokens_details": {"reasoning_tokens": 70}}},
            Usage(50, 90, 20, 0, 70, "o3", "resp_1"),
        ),
        (F.OPENAI, K.EMBEDDINGS, {"model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}, Usage(8, 0, 0, 0, 0, "text-embedding-3-small")),
        (F.OPENAI, K.CHAT, {"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}}, Usage(3, 4)),
        (F.OPENAI, K.CHAT, {"choices": []}, None),
        (
            F.ANTHROPIC, K.MESSAGES,
            {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 50, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 200, "output_tokens": 30}},
            Usage(350, 30, 200, 100, 0, "claude-sonnet-4-5", "msg_1"),
        ),
        (F.ANTHROPIC, K.MESSAGES, {"usage": None}, None),
        (
            F.GEMINI, K.CHAT,
            {"modelVersion": "gemini-2.5-flash", "responseId": "r-1", "usageMetadata": {"promptTokenCount": 150, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 20, "thoughtsTokenCount": 10, "cachedContentTokenCount": 100}},
            Usage(155, 30, 100, 0, 10, "gemini-2.5-flash", "r-1"),
        ),
        (F.GEMINI, K.CHAT, {"usage": {"prompt_tokens": 1}}, None),
    ],
)
def test_usage_from_json(family: Family, kind: EndpointKind, body: dict[str, Any], usage: Usage | None) -> None:
    assert adapter_for(family).usage_from_json(kind, body) == usage
    assert usage_from_json(family, kind, body) == usage


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("raw", [{}, {"input_tokens": True, "output_tokens": -3, "prompt_tokens": "9", "promptTokenCount": float("nan")}])
def test_hostile_counts_read_as_zero(family: Family, raw: dict[str, Any]) -> None:
    assert adapter_for(family).usage(raw, None, None) == Usage()


# --- stream events: usage, completion, text ------------------------------------------------------

STREAMS: list[tuple[Family, EndpointKind, list[dict[str, Any]], Usage | None, bool, str]] = [
    (
        F.OPENAI, K.CHAT,
        [
            {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
            {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"function": {"arguments": "{}"}}]}, "finish_reason": "stop"}]},
            {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}},
        ],
        Usage(12, 3, 0, 0, 0, "gpt-4o", "chatcmpl-1"), False, "Hello{}",
    ),
    (
        F.OPENAI, K.COMPLETIONS,
        [{"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"index": 0, "text": "abc", "finish_reason": None}]}],
        None, False, "abc",
    ),
    (
        F.OPENAI, K.RESPONSES,
        [
            {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4.1", "usage": None}},
            {"type": "response.output_text.delta", "delta": "Hi"},
            {"type": "response.output_audio.delta", "delta": "AAAA"},
            {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-4.1", "usage": {"input_tokens": 37, "output_tokens": 11, "output_tokens_details": {"reasoning_tokens": 3}}}},
        ],
        Usage(37, 11, 0, 0, 3, "gpt-4.1", "resp_1"), True, "Hi",
    ),
    (
        F.OPENAI, K.RESPONSES,
        [{"type": "response.failed", "response": {"usage": {"input_tokens": 5, "output_tokens": 0}}}],
        Usage(5, 0), False, "",
    ),
    (
        F.ANTHROPIC, K.MESSAGES,
        [
            {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 25, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 100, "output_tokens": 1}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " hmm"}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7, "input_tokens": None}},
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}},
            {"type": "message_stop"},
        ],
        Usage(2125, 15, 2000, 100, 0, "claude-sonnet-4-5", "msg_1"), True, "Hello hmm",
    ),
    (
        F.ANTHROPIC, K.MESSAGES,
        [{"type": "message_start", "message": {"id": "msg_2", "model": "claude-haiku-4-5", "usage": {"input_tokens": 9, "output_tokens": 1}}}],
        Usage(9, 1, 0, 0, 0, "claude-haiku-4-5", "msg_2"), False, "",
    ),
    (
        F.GEMINI, K.CHAT,
        [
            {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}], "usageMetadata": {"promptTokenCount": 10}, "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
            {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 25}},
        ],
        Usage(10, 30, 0, 0, 25, "gemini-2.5-flash", "r1"), True, 'Hi{"name":"f","args":{}}',
    ),
]


@pytest.mark.parametrize("family, kind, events, usage, completed, text", STREAMS)
def test_observe_events(
    family: Family, kind: EndpointKind, events: list[dict[str, Any]], usage: Usage | None, completed: bool, text: str
) -> None:
    adapter = adapter_for(family)
    state = StreamState()
    for event in events:
        adapter.observe(kind, event, state)
    got = None if state.raw_usage is None else adapter.usage(state.raw_usage, state.model, state.response_id)
    assert (got, state.completed, state.output_text) == (usage, completed, text)
    assert state.output_text_bytes == len(text.encode())


@pytest.mark.parametrize("family, kind, events, usage, completed, text", STREAMS)
def test_stream_tap_reports_what_the_adapter_reads(
    family: Family, kind: EndpointKind, events: list[dict[str, Any]], usage: Usage | None, completed: bool, text: str
) -> None:
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    tap = StreamTap(family, kind)
    out = b"".join(tap.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + tap.feed(b"")
    assert out == stream
    assert (tap.usage, tap.completed, tap.output_text) == (usage, completed, text)


def test_output_text_is_capped_but_every_byte_counted() -> None:
    state = StreamState()
    adapter_for(F.ANTHROPIC).observe(
        K.MESSAGES, {"type": "content_block_delta", "delta": {"text": "é" * OUTPUT_TEXT_LIMIT}}, state
    )
    assert state.output_text_bytes == 2 * OUTPUT_TEXT_LIMIT
    assert len(state.output_text.encode()) == OUTPUT_TEXT_LIMIT


# --- OpenAI only: the usage chunk the gateway asks for, and removes ------------------------------


@pytest.mark.parametrize(
    "chunk, usage_only",
    [
        ({"choices": [], "usage": {"prompt_tokens": 1}}, True),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": None}], "usage": {"prompt_tokens": 1}}, True),
        ({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}}, False),
        ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1}}, False),
        ({"choices": [], "usage": None}, False),
    ],
)
def test_is_usage_only_chunk(chunk: dict[str, Any], usage_only: bool) -> None:
    assert openai.is_usage_only_chunk(chunk) is usage_only


@pytest.mark.parametrize(
    "raw, cut",
    [
        (b'data: {"id":"c","choices":[],"usage":null}\n\n', b'data: {"id":"c","choices":[]}\n\n'),
        (b'data: {"usage" : null, "id":"c"}\n\n', b'data: { "id":"c"}\n\n'),  # still valid JSON
        (b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n', b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n'),
    ],
)
def test_cut_usage_null(raw: bytes, cut: bytes) -> None:
    assert openai.cut_usage_null(raw) == cut


@pytest.mark.parametrize(
    "body, asked, options",
    [
        ({"stream": True}, True, {"include_usage": True}),
        ({"stream": True, "stream_options": {"include_usage": True}}, False, {"include_usage": True}),
        ({"stream": True, "stream_options": {"include_obfuscation": False}}, True, {"include_obfuscation": False, "include_usage": True}),
        ({"stream": False}, False, None),
    ],
)
def test_add_include_usage(body: dict[str, Any], asked: bool, options: dict[str, Any] | None) -> None:
    assert openai.add_include_usage(body) is asked
    assert body.get("stream_options") == options
