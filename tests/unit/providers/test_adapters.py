"""spendgate.providers.{openai,anthropic,gemini}: one adapter per wire family, one interface.

One table per function. Each row runs the family's adapter directly and, where `spendgate.providers`
dispatches to it, through that function too, so a row shows both what the adapter reads and that
callers get it. Stream framing (SSE, JSON arrays, byte-exact stripping) is in `test_stream.py`.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import genai_prices
import pytest

from spendgate.providers import (
    BUILTIN_PROVIDERS,
    adapter_for,
    endpoint_kind_for,
    openai,
    prompt_of,
    request_facts,
    usage_from_json,
)
from spendgate.providers.base import OUTPUT_TEXT_LIMIT, StreamFormat, StreamState, WireAdapter
from spendgate.providers.stream import StreamTap
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Usage

F, K = Family, EndpointKind
SPEC = {F.OPENAI: BUILTIN_PROVIDERS["openai"], F.ANTHROPIC: BUILTIN_PROVIDERS["anthropic"],
        F.GEMINI: BUILTIN_PROVIDERS["gemini"]}
INTERFACE = [name for name, _ in inspect.getmembers(WireAdapter, inspect.isfunction) if not name.startswith("_")]


# --- the interface ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(Family))
def test_each_family_has_an_adapter_for_it(family: Family) -> None:
    adapter = adapter_for(family)
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


# --- endpoint kind from method + path -----------------------------------------------------------


@pytest.mark.parametrize(
    "family, method, path, kind",
    [
        (F.OPENAI, "POST", "/v1/chat/completions", K.CHAT),
        (F.OPENAI, "post", "/v1/chat/completions/", K.CHAT),
        (F.OPENAI, "POST", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21", K.CHAT),
        (F.OPENAI, "POST", "/openai/v1/chat/completions", K.CHAT),  # groq
        (F.OPENAI, "POST", "/api/v1/chat/completions", K.CHAT),  # openrouter
        (F.OPENAI, "POST", "/v1/responses", K.RESPONSES),
        (F.OPENAI, "POST", "/v1/completions", K.COMPLETIONS),
        (F.OPENAI, "POST", "/v1/completions?x=1", K.COMPLETIONS),
        (F.OPENAI, "POST", "/v1/embeddings", K.EMBEDDINGS),
        (F.OPENAI, "POST", "/openai/deployments/emb/embeddings?api-version=1", K.EMBEDDINGS),
        (F.OPENAI, "GET", "/v1/responses/resp_123", K.OTHER),
        (F.OPENAI, "GET", "/v1/chat/completions", K.OTHER),
        (F.OPENAI, "GET", "/v1/models", K.MODELS),
        (F.OPENAI, "GET", "/v1/models/gpt-4o", K.MODELS),
        (F.OPENAI, "POST", "/v1/files", K.FILES),
        (F.OPENAI, "GET", "/v1/files/file-1/content", K.FILES),
        (F.OPENAI, "POST", "/v1/responses/resp_1/cancel", K.OTHER),
        (F.OPENAI, "POST", "/v1/images/generations", K.IMAGES),
        (F.OPENAI, "POST", "/v1/images/edits", K.IMAGES),
        (F.OPENAI, "POST", "/v1/audio/speech", K.AUDIO),
        (F.OPENAI, "POST", "/v1/audio/transcriptions", K.AUDIO),
        (F.OPENAI, "POST", "/v1/batches", K.BATCHES),
        (F.OPENAI, "GET", "/v1/batches/batch_1", K.BATCHES),
        (F.OPENAI, "GET", "/v1/realtime?model=gpt-realtime", K.REALTIME),
        (F.OPENAI, "POST", "/v1/realtime/client_secrets", K.REALTIME),
        (F.OPENAI, "POST", "/v1/fine_tuning/jobs", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/messages", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages?beta=true", K.MESSAGES),
        (F.ANTHROPIC, "POST", "/v1/messages/count_tokens", K.OTHER),
        (F.ANTHROPIC, "POST", "/v1/messages/batches", K.BATCHES),
        (F.ANTHROPIC, "GET", "/v1/messages", K.OTHER),
        (F.ANTHROPIC, "GET", "/v1/models", K.MODELS),
        (F.ANTHROPIC, "POST", "/v1/chat/completions", K.OTHER),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:generateContent", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", K.CHAT),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", K.OTHER),
        (F.GEMINI, "POST", "/v1beta/models/text-embedding-004:embedContent", K.EMBEDDINGS),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", K.BATCHES),
        (F.GEMINI, "GET", "/v1beta/models/gemini-2.5-flash:generateContent", K.OTHER),
        (F.GEMINI, "GET", "/v1beta/models", K.MODELS),
        (F.GEMINI, "GET", "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent", K.REALTIME),
    ],
)
def test_endpoint_kind(family: Family, method: str, path: str, kind: EndpointKind) -> None:
    assert adapter_for(family).endpoint_kind(method, path) is kind
    assert endpoint_kind_for(family, method, path) is kind


@pytest.mark.parametrize(
    "family, method, path, name",
    [
        (F.OPENAI, "POST", "/v1/chat/completions", None),
        (F.OPENAI, "POST", "/v1/images/generations", None),
        (F.OPENAI, "POST", "/v1/files", None),
        (F.OPENAI, "POST", "/v1/uploads/up_1/parts", None),
        (F.OPENAI, "POST", "/v1/moderations", None),
        (F.OPENAI, "POST", "/v1/responses/resp_1/cancel", None),
        (F.OPENAI, "POST", "/v1/responses/input_tokens", None),
        (F.OPENAI, "GET", "/v1/batches", None),
        (F.OPENAI, "POST", "/v1/batches", "batches"),
        (F.OPENAI, "POST", "/v1/batches/batch_1/cancel", None),
        (F.OPENAI, "POST", "/v1/fine_tuning/jobs", "fine_tuning"),
        (F.OPENAI, "POST", "/openai/fine_tuning/jobs?api-version=1", "fine_tuning"),
        (F.OPENAI, "POST", "/v1/threads/thread_1/runs", "threads"),
        (F.OPENAI, "POST", "/v1/realtime/client_secrets", "realtime"),
        (F.OPENAI, "POST", "/v1/ocr", "ocr"),  # mistral
        (F.ANTHROPIC, "POST", "/v1/messages/batches", "batches"),
        (F.ANTHROPIC, "POST", "/v1/messages/count_tokens", None),
        (F.ANTHROPIC, "POST", "/v1/complete", "complete"),
        (F.ANTHROPIC, "POST", "/api/event_logging/batch", None),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", "batches"),
        (F.GEMINI, "POST", "/v1beta/models/imagen-3.0:predict", "predict"),
        (F.GEMINI, "POST", "/v1beta/cachedContents", "cachedContents"),
        (F.GEMINI, "POST", "/v1beta/models/gemini-2.5-flash:countTokens", None),
        (F.GEMINI, "POST", "/upload/v1beta/files", None),
    ],
)
def test_unmetered_endpoints_are_named(family: Family, method: str, path: str, name: str | None) -> None:
    assert adapter_for(family).unmetered(method, path) == name


# --- model / stream / max output tokens from the request ---------------------------------------

GEMINI_VERTEX = "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:generateContent"


@pytest.mark.parametrize(
    "family, kind, body, path, facts",
    [
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": True, "max_completion_tokens": 64, "max_tokens": 9},
         "/v1/chat/completions", RequestFacts("gpt-4o", True, 64)),
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "max_completion_tokens": None, "max_tokens": 9},
         "/v1/chat/completions", RequestFacts("gpt-4o", False, 9)),
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": True, "max_tokens": 100}, "/v1/chat/completions",
         RequestFacts("gpt-4o", True, 100)),
        (F.OPENAI, K.CHAT, {"model": "o3", "max_completion_tokens": 5000}, "/v1/chat/completions",
         RequestFacts("o3", False, 5000)),
        # A limit as a string is read as the number it says: a lax provider would honour it.
        (F.OPENAI, K.CHAT, {"model": "gpt-4o", "stream": "yes", "max_tokens": "9"}, "/v1/chat/completions",
         RequestFacts("gpt-4o", False, 9)),
        (F.OPENAI, K.RESPONSES, {"model": "o3", "stream": "yes", "max_output_tokens": 100}, "/v1/responses",
         RequestFacts("o3", False, 100)),
        (F.OPENAI, K.RESPONSES, {"model": "gpt-5", "max_output_tokens": 64, "stream": True}, "/v1/responses",
         RequestFacts("gpt-5", True, 64)),
        (F.OPENAI, K.EMBEDDINGS, {"model": "text-embedding-3-small", "input": "x"}, "/v1/embeddings",
         RequestFacts("text-embedding-3-small", False, None)),
        # The OpenAI wire format has no model here; the Azure spec row reads it from the path
        # (test_providers.py).
        (F.OPENAI, K.CHAT, {"messages": [], "max_tokens": True}, "/openai/deployments/d/chat/completions",
         RequestFacts(None, False, None)),
        (F.OPENAI, K.CHAT, None, "/v1/chat/completions", RequestFacts(None, False, None)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 1024}, "/v1/messages",
         RequestFacts("claude-sonnet-4-5", True, 1024)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "claude-opus-4-1", "max_tokens": 1024, "stream": True}, "/v1/messages",
         RequestFacts("claude-opus-4-1", True, 1024)),
        (F.ANTHROPIC, K.MESSAGES, {"model": "", "max_tokens": "1024"}, "/v1/messages",
         RequestFacts(None, False, 1024)),
        (F.GEMINI, K.CHAT, {"generationConfig": {"maxOutputTokens": 256}},
         "/v1beta/models/gemini-2.5-flash:generateContent", RequestFacts("gemini-2.5-flash", False, 256)),
        (F.GEMINI, K.CHAT, {"generationConfig": {"maxOutputTokens": 256}},
         "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", RequestFacts("gemini-2.5-flash", True, 256)),
        (F.GEMINI, K.CHAT, {"stream": True}, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
         RequestFacts("gemini-2.5-pro", True, None)),
        (F.GEMINI, K.CHAT, {}, "/v1/models/gemini-2.0-flash-001:generateContent",
         RequestFacts("gemini-2.0-flash-001", False, None)),
        (F.GEMINI, K.CHAT, {}, GEMINI_VERTEX, RequestFacts("gemini-2.5-pro", False, None)),
        (F.GEMINI, K.CHAT, {}, "/v1beta/tunedModels/my-tune:generateContent", RequestFacts("my-tune", False, None)),
        (F.GEMINI, K.CHAT, {"model": "gemini-x"}, "/v1beta/cachedContents", RequestFacts("gemini-x", False, None)),
    ],
)
def test_request_facts(
    family: Family, kind: EndpointKind, body: dict[str, Any] | None, path: str, facts: RequestFacts
) -> None:
    assert adapter_for(family).request_facts(kind, body or {}, path) == facts
    assert request_facts(SPEC[family], kind, body, path) == facts


# --- usage from a JSON response -----------------------------------------------------------------
# Bodies shaped as the providers send them.

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
    "family, kind, body, usage",
    [
        (F.OPENAI, K.CHAT, OPENAI_CHAT, Usage(1200, 300, 1024, 0, 128, "gpt-4o-2024-08-06", "chatcmpl-abc")),
        (
            F.OPENAI, K.CHAT,
            {"id": "chatcmpl-1", "model": "gpt-4o", "usage": {
                "prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 64},
                "completion_tokens_details": {"reasoning_tokens": 8}}},
            Usage(120, 30, 64, 0, 8, "gpt-4o", "chatcmpl-1"),
        ),
        (F.OPENAI, K.RESPONSES, OPENAI_RESPONSES, Usage(500, 900, 200, 0, 700, "o3-2025-04-16", "resp_1")),
        (F.OPENAI, K.EMBEDDINGS, OPENAI_EMBEDDINGS, Usage(8, 0, 0, 0, 0, "text-embedding-3-small", None)),
        (
            F.OPENAI, K.CHAT,
            {"model": "deepseek-chat", "usage": {"prompt_tokens": 100, "completion_tokens": 5,
                                                 "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}},
            Usage(100, 5, 64, 0, 0, "deepseek-chat", None),
        ),
        (F.OPENAI, K.CHAT, {"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}}, Usage(3, 4)),
        (F.OPENAI, K.CHAT, {"choices": []}, None),
        (F.OPENAI, K.CHAT, {"usage": None}, None),
        (F.OPENAI, K.CHAT, {"usage": {"prompt_tokens": True, "completion_tokens": -3}}, Usage()),
        (F.ANTHROPIC, K.MESSAGES, ANTHROPIC_MESSAGE,
         Usage(3050, 300, 2000, 1000, 0, "claude-sonnet-4-5-20250929", "msg_01")),
        (
            F.ANTHROPIC, K.MESSAGES,
            {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {
                "input_tokens": 50, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 200,
                "output_tokens": 30}},
            Usage(350, 30, 200, 100, 0, "claude-sonnet-4-5", "msg_1"),
        ),
        (F.ANTHROPIC, K.MESSAGES, {"usage": None}, None),
        (F.ANTHROPIC, K.OTHER, {"input_tokens": 12}, None),  # count_tokens answers are free
        (F.GEMINI, K.CHAT, GEMINI_RESPONSE, Usage(1500, 300, 1000, 0, 100, "gemini-2.5-flash", "r-1")),
        (
            F.GEMINI, K.CHAT,
            {"modelVersion": "gemini-2.5-flash", "responseId": "r-1", "usageMetadata": {
                "promptTokenCount": 150, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 20,
                "thoughtsTokenCount": 10, "cachedContentTokenCount": 100}},
            Usage(155, 30, 100, 0, 10, "gemini-2.5-flash", "r-1"),
        ),
        (F.GEMINI, K.CHAT, {"usage": {"prompt_tokens": 1}}, None),
        (F.GEMINI, K.CHAT, {"candidates": []}, None),
    ],
)
def test_usage_from_json(family: Family, kind: EndpointKind, body: dict[str, Any], usage: Usage | None) -> None:
    assert adapter_for(family).usage_from_json(kind, body) == usage
    assert usage_from_json(family, kind, body) == usage


def test_usage_from_a_body_that_is_not_an_object_is_none() -> None:
    assert usage_from_json(F.OPENAI, K.CHAT, [1, 2]) is None  # type: ignore[arg-type]


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


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("raw", [{}, {"input_tokens": True, "output_tokens": -3, "prompt_tokens": "9",
                                      "promptTokenCount": float("nan")}])
def test_hostile_counts_read_as_zero(family: Family, raw: dict[str, Any]) -> None:
    assert adapter_for(family).usage(raw, None, None) == Usage()


# --- the prompt: what a request is billed for as input --------------------------------------------


@pytest.mark.parametrize(
    "family, kind, body, text, media, overhead",
    [
        (F.OPENAI, K.CHAT, {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         "Be terse.\nWhat is this?", 1, 2 * 3 + 3),
        (F.OPENAI, K.CHAT, {"messages": [{"role": "user", "content": "hi"}],
                            "tools": [{"type": "function", "function": {"name": "f"}}]},
         'hi\n[{"type":"function","function":{"name":"f"}}]', 0, 3 + 3),
        (F.OPENAI, K.RESPONSES, {"input": "Tell me a joke", "instructions": "Be brief"},
         "Be brief\nTell me a joke", 0, 0),
        (F.OPENAI, K.RESPONSES, {"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "https://x/y.png"}]}]},
         "hi", 1, 3 + 3),
        (F.OPENAI, K.COMPLETIONS, {"prompt": "Once upon a time"}, "Once upon a time", 0, 0),
        (F.OPENAI, K.COMPLETIONS, {"prompt": [1, 2, 3, 4]}, "", 0, 4),  # token ids: counted, not encoded
        (F.OPENAI, K.EMBEDDINGS, {"input": ["alpha", "beta"]}, "alpha\nbeta", 0, 0),
        (F.OPENAI, K.EMBEDDINGS, {"input": [[1, 2], [3]]}, "", 0, 3),
        (F.ANTHROPIC, K.MESSAGES, {
            "system": [{"type": "text", "text": "Be nice", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
                    {"type": "text", "text": "Describe"}]},
                {"role": "assistant", "content": "Sure"}]},
         "Be nice\nDescribe\nSure", 1, 2 * 3 + 3),
        (F.GEMINI, K.CHAT, {
            "systemInstruction": {"parts": [{"text": "Be nice"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hello"},
                                           {"inlineData": {"mimeType": "image/jpeg", "data": "AA"}}]},
                {"role": "model", "parts": [{"text": "Hi"}]}]},
         "Be nice\nHello\nHi", 1, 2 * 3),  # framing per turn, no reply priming
    ],
)
def test_prompt(family: Family, kind: EndpointKind, body: dict[str, Any], text: str, media: int,
                overhead: int) -> None:
    for prompt in (adapter_for(family).prompt(kind, body), prompt_of(family, kind, body)):
        assert prompt is not None
        assert (prompt.text, prompt.media, prompt.overhead) == (text, media, overhead)


@pytest.mark.parametrize("family, kind", [(F.OPENAI, K.OTHER), (F.ANTHROPIC, K.OTHER), (F.GEMINI, K.OTHER),
                                          (F.ANTHROPIC, K.CHAT)])
def test_endpoints_without_a_prompt(family: Family, kind: EndpointKind) -> None:
    assert adapter_for(family).prompt(kind, {"messages": [{"role": "user", "content": "x"}], "input": "x"}) is None


# --- streams: how they are framed, and asking for their usage ----------------------------------------


@pytest.mark.parametrize(
    "family, content_type, stream, fmt",
    [
        (F.OPENAI, "text/event-stream", True, StreamFormat.SSE),
        (F.OPENAI, "text/event-stream; charset=utf-8", False, StreamFormat.SSE),
        (F.OPENAI, "application/json", True, None),
        (F.ANTHROPIC, "text/event-stream", True, StreamFormat.SSE),
        (F.ANTHROPIC, "application/json", True, None),
        (F.GEMINI, "text/event-stream", True, StreamFormat.SSE),  # ?alt=sse
        (F.GEMINI, "application/json; charset=UTF-8", True, StreamFormat.JSON_ARRAY),  # one array, piecemeal
        (F.GEMINI, "application/json", False, None),  # generateContent: one JSON answer
    ],
)
def test_stream_format(family: Family, content_type: str, stream: bool, fmt: StreamFormat | None) -> None:
    assert adapter_for(family).stream_format(content_type, stream) is fmt


@pytest.mark.parametrize(
    "family, kind, body, asked, after",
    [
        (F.OPENAI, K.CHAT, {"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        (F.OPENAI, K.COMPLETIONS, {"stream": True}, True,
         {"stream": True, "stream_options": {"include_usage": True}}),
        (F.OPENAI, K.CHAT, {"stream": True, "stream_options": {"include_usage": True}}, False,
         {"stream": True, "stream_options": {"include_usage": True}}),
        (F.OPENAI, K.CHAT, {"stream": False}, False, {"stream": False}),
        # Only chat and completions streams need asking; the others report usage anyway.
        (F.OPENAI, K.RESPONSES, {"stream": True}, False, {"stream": True}),
        (F.OPENAI, K.EMBEDDINGS, {"stream": True}, False, {"stream": True}),
        (F.ANTHROPIC, K.MESSAGES, {"stream": True}, False, {"stream": True}),
        (F.GEMINI, K.CHAT, {}, False, {}),
    ],
)
def test_prepare_stream(family: Family, kind: EndpointKind, body: dict[str, Any], asked: bool,
                        after: dict[str, Any]) -> None:
    assert adapter_for(family).prepare_stream(kind, body) is asked
    assert body == after


@pytest.mark.parametrize(
    "body, asked, after",
    [
        ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": True, "stream_options": None}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": True, "stream_options": {"include_obfuscation": False}}, True,
         {"stream": True, "stream_options": {"include_obfuscation": False, "include_usage": True}}),
        ({"stream": True, "stream_options": {"include_usage": False}}, True,
         {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": True, "stream_options": {"include_usage": True}}, False,
         {"stream": True, "stream_options": {"include_usage": True}}),
        ({"stream": False}, False, {"stream": False}),
        ({"stream": "yes"}, False, {"stream": "yes"}),
        ({}, False, {}),
    ],
)
def test_add_include_usage(body: dict[str, Any], asked: bool, after: dict[str, Any]) -> None:
    assert openai.add_include_usage(body) is asked
    assert body == after


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
        (b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n',
         b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n'),
    ],
)
def test_cut_usage_null(raw: bytes, cut: bytes) -> None:
    assert openai.cut_usage_null(raw) == cut


USAGE_CHUNK = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
NULL_CHUNK = {"id": "c", "choices": [{"delta": {"content": "x"}}], "usage": None}
PLAIN_CHUNK = {"id": "c", "choices": [{"delta": {"content": "x"}}]}


def _raw(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


@pytest.mark.parametrize(
    "family, event, out",
    [
        (F.OPENAI, USAGE_CHUNK, b""),  # the chunk the gateway asked for: dropped
        (F.OPENAI, NULL_CHUNK, _raw(PLAIN_CHUNK)),  # the "usage":null it added: cut
        (F.OPENAI, PLAIN_CHUNK, _raw(PLAIN_CHUNK)),
        (F.ANTHROPIC, USAGE_CHUNK, _raw(USAGE_CHUNK)),  # never asked, so never changed
        (F.GEMINI, NULL_CHUNK, _raw(NULL_CHUNK)),
    ],
)
def test_unask_usage(family: Family, event: dict[str, Any], out: bytes) -> None:
    assert adapter_for(family).unask_usage(event, _raw(event)) == out


# --- stream events: usage, completion, text ------------------------------------------------------

STREAMS: list[tuple[Family, EndpointKind, list[dict[str, Any]], Usage | None, bool, str]] = [
    (
        F.OPENAI, K.CHAT,
        [
            {"id": "chatcmpl-1", "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
            {"id": "chatcmpl-1", "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"function": {"arguments": "{}"}}]},
                          "finish_reason": "stop"}]},
            {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [],
             "usage": {"prompt_tokens": 12, "completion_tokens": 3}},
        ],
        Usage(12, 3, 0, 0, 0, "gpt-4o", "chatcmpl-1"), False, "Hello{}",
    ),
    (
        F.OPENAI, K.COMPLETIONS,
        [{"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct",
          "choices": [{"index": 0, "text": "abc", "finish_reason": None}]}],
        None, False, "abc",
    ),
    (
        F.OPENAI, K.RESPONSES,
        [
            {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4.1", "usage": None}},
            {"type": "response.output_text.delta", "delta": "Hi"},
            {"type": "response.output_audio.delta", "delta": "AAAA"},
            {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-4.1", "usage": {
                "input_tokens": 37, "output_tokens": 11, "output_tokens_details": {"reasoning_tokens": 3}}}},
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
            {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {
                "input_tokens": 25, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 100,
                "output_tokens": 1}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " hmm"}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 7, "input_tokens": None}},
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 15}},
            {"type": "message_stop"},
        ],
        Usage(2125, 15, 2000, 100, 0, "claude-sonnet-4-5", "msg_1"), True, "Hello hmm",
    ),
    (
        F.ANTHROPIC, K.MESSAGES,
        [{"type": "message_start", "message": {"id": "msg_2", "model": "claude-haiku-4-5",
                                               "usage": {"input_tokens": 9, "output_tokens": 1}}}],
        Usage(9, 1, 0, 0, 0, "claude-haiku-4-5", "msg_2"), False, "",
    ),
    (
        F.GEMINI, K.CHAT,
        [
            {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}], "usageMetadata": {"promptTokenCount": 10},
             "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
            {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
                             "finishReason": "STOP"}],
             "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 25}},
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
    tap = StreamTap(adapter_for(family), kind, StreamFormat.SSE)
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
