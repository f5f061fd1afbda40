"""spendgate.providers.{openai,anthropic,gemini}: what the caps need of each adapter (issue 12).

What a request asks for, read as a provider would read it (every answer, every spelling of a
limit, numbers sent as floats or strings); lowering its output limit in the provider's own field
(`set_output_limit`); the text of an answer without usage (`response_text`); what images and
audio bill before they are sent (`media_usage`) and what their answers report (`usage_from_json`),
and the usage blocks of the WebSocket protocols (Realtime, Gemini Live). Bodies shaped as the
providers document them. The rest of the adapters' interface is in test_adapters.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from spendgate.providers import BUILTIN_PROVIDERS, adapter_for, request_facts, usage_from_json
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Upload, Usage

F, K = Family, EndpointKind
SPEC = BUILTIN_PROVIDERS
MSGS = [{"role": "user", "content": "hi"}]
GEMINI = "/v1beta/models/gemini-2.5-pro:generateContent"


# --- what a request asks for, read as the provider reads it ------------------------------------------------


@pytest.mark.parametrize(
    "provider, kind, body, path, choices, limit",
    [
        ("openai", K.CHAT, {"model": "gpt-4o", "messages": MSGS, "n": 4, "max_tokens": 100}, "/v1/chat/completions",
         4, 100),
        ("openai", K.CHAT, {"model": "gpt-4o", "n": 4.0}, "/v1/chat/completions", 4, None),  # 4.0 is 4 to a validator
        ("openai", K.CHAT, {"model": "gpt-4o", "n": 2.5}, "/v1/chat/completions", 3, None),  # rounded up
        ("openai", K.CHAT, {"model": "gpt-4o", "n": "8"}, "/v1/chat/completions", 8, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "n": " 8 "}, "/v1/chat/completions", 8, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "n": 10**12}, "/v1/chat/completions", 128, None),  # the API's most
        ("openai", K.CHAT, {"model": "gpt-4o", "n": "9" * 40}, "/v1/chat/completions", 1, None),  # no such number
        ("openai", K.CHAT, {"model": "gpt-4o", "n": -3}, "/v1/chat/completions", 1, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "n": True}, "/v1/chat/completions", 1, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "n": float("nan")}, "/v1/chat/completions", 1, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "max_tokens": 64000.0}, "/v1/chat/completions", 1, 64000),
        ("openai", K.CHAT, {"model": "gpt-4o", "max_tokens": "64000"}, "/v1/chat/completions", 1, 64000),
        ("openai", K.CHAT, {"model": "gpt-4o", "max_tokens": 1e300}, "/v1/chat/completions", 1, int(1e300)),
        ("openai", K.CHAT, {"model": "gpt-4o", "max_tokens": float("inf")}, "/v1/chat/completions", 1, None),
        ("openai", K.CHAT, {"model": "gpt-4o", "max_tokens": -5}, "/v1/chat/completions", 1, -5),
        # Both names set: a provider may honour either, so the larger counts.
        ("openai", K.CHAT, {"model": "o3", "max_completion_tokens": 10, "max_tokens": 64000}, "/v1/chat/completions",
         1, 64000),
        ("openai", K.CHAT, {"model": "o3", "max_completion_tokens": 64000, "max_tokens": 10}, "/v1/chat/completions",
         1, 64000),
        ("openai", K.CHAT, {"model": "o3", "max_completion_tokens": None, "max_tokens": 10}, "/v1/chat/completions",
         1, 10),
        # best_of answers are all generated; n of them returned.
        ("openai", K.COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "n": 2, "best_of": 5}, "/v1/completions", 5,
         None),
        ("openai", K.COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "n": 3, "best_of": "1"}, "/v1/completions", 3,
         None),
        ("openai", K.IMAGES, {"model": "dall-e-2", "n": "6"}, "/v1/images/generations", 6, None),
        ("openai", K.RESPONSES, {"model": "gpt-5", "n": 5}, "/v1/responses", 1, None),  # Responses has no n
        ("anthropic", K.MESSAGES, {"model": "claude-sonnet-4-5", "max_tokens": 1024.5}, "/v1/messages", 1, 1025),
        ("anthropic", K.MESSAGES, {"model": "claude-sonnet-4-5", "max_tokens": 10, "max_output_tokens": 9000},
         "/v1/messages", 1, 9000),
        ("gemini", K.CHAT, {"generationConfig": {"candidateCount": "8", "maxOutputTokens": "2048"}}, GEMINI, 8, 2048),
        ("gemini", K.CHAT, {"generationConfig": {"candidateCount": 3.0}}, GEMINI, 3, None),
        # The proto field names are as good as the JSON ones to Gemini's parser.
        ("gemini", K.CHAT, {"generation_config": {"candidate_count": 4, "max_output_tokens": 300}}, GEMINI, 4, 300),
        ("gemini", K.CHAT, {"generationConfig": {"maxOutputTokens": 10}, "generation_config": {
            "maxOutputTokens": 9000, "candidateCount": 2}}, GEMINI, 2, 9000),
        ("gemini", K.CHAT, {"generationConfig": "not an object"}, GEMINI, 1, None),
        # proto3 JSON: 0 is "not set", the model's own maximum; never read as "no output".
        ("gemini", K.CHAT, {"generationConfig": {"maxOutputTokens": 0}}, GEMINI, 1, None),
        ("gemini", K.CHAT, {"generationConfig": {"maxOutputTokens": "0"}}, GEMINI, 1, None),
    ],
)
def test_what_a_request_asks_for(provider: str, kind: EndpointKind, body: dict[str, Any], path: str, choices: int,
                                 limit: int | None) -> None:
    facts = request_facts(SPEC[provider], kind, body, path)
    assert (facts.choices, facts.max_output_tokens) == (choices, limit)


@pytest.mark.parametrize("config, budget", [
    ({"thinkingConfig": {"thinkingBudget": 8192}}, 8192),
    ({"thinking_config": {"thinking_budget": "8192"}}, 8192),
    ({"thinkingConfig": {"thinkingBudget": -1}}, 0),  # dynamic: bounded by the output limit
    ({"thinkingConfig": {"thinkingBudget": 0}}, 0),
    ({}, 0),
])
def test_gemini_thinking_budget(config: dict[str, Any], budget: int) -> None:
    facts = request_facts(SPEC["gemini"], K.CHAT, {"generationConfig": config}, GEMINI)
    assert facts.thinking_budget == budget


@pytest.mark.parametrize("path, model", [
    ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "gpt-4o"),
    ("/openai/deployments/gpt%2D4o/chat/completions?api-version=2024-10-21", "gpt-4o"),  # as Azure decodes it
    ("/openai/deployments/gpt-4o%2Fmini/chat/completions", "gpt-4o/mini"),
    ("/openai/deployments/o3/chat/completions?deployment=gpt-4o-mini", "o3"),  # the path, not the query
])
def test_azure_s_deployment_is_the_model_whatever_the_body_says(path: str, model: str) -> None:
    facts = request_facts(SPEC["azure"], K.CHAT, {"model": "gpt-4o-mini", "messages": MSGS}, path)
    assert facts.model == model


# --- lowering the output limit -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, kind, body, field, after",
    [
        (F.OPENAI, K.CHAT, {"max_tokens": 64000}, "max_completion_tokens", {"max_tokens": 300}),
        (F.OPENAI, K.CHAT, {"max_completion_tokens": 64000}, "max_tokens", {"max_completion_tokens": 300}),
        (F.OPENAI, K.CHAT, {"max_completion_tokens": 64000, "max_tokens": 64000}, "max_tokens",
         {"max_completion_tokens": 300, "max_tokens": 300}),  # every one of them
        (F.OPENAI, K.CHAT, {"max_completion_tokens": 64000, "max_tokens": 50}, "max_tokens",
         {"max_completion_tokens": 300, "max_tokens": 50}),  # ... but none raised
        (F.OPENAI, K.CHAT, {"max_tokens": -1}, "max_tokens", {"max_tokens": 300}),
        (F.OPENAI, K.CHAT, {"max_tokens": "64000"}, "max_tokens", {"max_tokens": 300}),  # as a number now
        (F.OPENAI, K.CHAT, {"max_tokens": None}, "max_completion_tokens", {"max_tokens": None,
                                                                           "max_completion_tokens": 300}),
        (F.OPENAI, K.CHAT, {}, "max_completion_tokens", {"max_completion_tokens": 300}),  # OpenAI's own
        (F.OPENAI, K.CHAT, {}, "max_tokens", {"max_tokens": 300}),  # the compatible providers'
        (F.OPENAI, K.RESPONSES, {}, "max_tokens", {"max_output_tokens": 300}),
        (F.OPENAI, K.RESPONSES, {"max_output_tokens": 9000}, "max_tokens", {"max_output_tokens": 300}),
        (F.OPENAI, K.COMPLETIONS, {}, "max_completion_tokens", {"max_tokens": 300}),
        (F.ANTHROPIC, K.MESSAGES, {"max_tokens": 64000}, "max_tokens", {"max_tokens": 300}),
        (F.ANTHROPIC, K.MESSAGES, {}, "max_tokens", {"max_tokens": 300}),
        (F.ANTHROPIC, K.MESSAGES, {"max_tokens": 64000, "max_completion_tokens": 20}, "max_tokens",
         {"max_tokens": 300, "max_completion_tokens": 20}),
        (F.ANTHROPIC, K.MESSAGES, {"max_tokens": 64000, "thinking": {"type": "enabled", "budget_tokens": 32000}},
         "max_tokens", {"max_tokens": 300, "thinking": {"type": "enabled", "budget_tokens": 299}}),
        (F.ANTHROPIC, K.MESSAGES, {"max_tokens": 64000, "thinking": {"type": "enabled", "budget_tokens": 100}},
         "max_tokens", {"max_tokens": 300, "thinking": {"type": "enabled", "budget_tokens": 100}}),
        (F.GEMINI, K.CHAT, {}, "max_tokens", {"generationConfig": {"maxOutputTokens": 300}}),
        (F.GEMINI, K.CHAT, {"generationConfig": None}, "max_tokens", {"generationConfig": {"maxOutputTokens": 300}}),
        (F.GEMINI, K.CHAT, {"generationConfig": {"maxOutputTokens": 64000, "thinkingConfig": {
            "thinkingBudget": 24576, "includeThoughts": True}}}, "max_tokens", {"generationConfig": {
                "maxOutputTokens": 300, "thinkingConfig": {"thinkingBudget": 300, "includeThoughts": True}}}),
        (F.GEMINI, K.CHAT, {"generationConfig": {"thinkingConfig": {"thinkingBudget": -1}}}, "max_tokens",
         {"generationConfig": {"maxOutputTokens": 300, "thinkingConfig": {"thinkingBudget": -1}}}),
        # The proto spelling is lowered where it is, not shadowed by a second spelling.
        (F.GEMINI, K.CHAT, {"generation_config": {"max_output_tokens": 64000, "thinking_config": {
            "thinking_budget": 9000}}}, "max_tokens", {"generation_config": {"max_output_tokens": 300,
                                                                             "thinking_config": {
                                                                                 "thinking_budget": 300}}}),
        (F.GEMINI, K.CHAT, {"generationConfig": {"maxOutputTokens": 64000}, "generation_config": {
            "max_output_tokens": 100}}, "max_tokens", {"generationConfig": {"maxOutputTokens": 300},
                                                        "generation_config": {"max_output_tokens": 100}}),
        (F.GEMINI, K.CHAT, {"generation_config": {"candidate_count": 2}}, "max_tokens",
         {"generation_config": {"candidate_count": 2, "maxOutputTokens": 300}}),
    ],
)
def test_set_output_limit(family: Family, kind: EndpointKind, body: dict[str, Any], field: str,
                          after: dict[str, Any]) -> None:
    body = copy.deepcopy(body)
    adapter_for(family).set_output_limit(kind, body, 300, field)
    assert body == after


@pytest.mark.parametrize("provider, kind, body, path", [
    ("openai", K.CHAT, {"max_tokens": "64000", "max_completion_tokens": 64000.0}, "/v1/chat/completions"),
    ("anthropic", K.MESSAGES, {"max_tokens": 64000}, "/v1/messages"),
    ("gemini", K.CHAT, {"generationConfig": {"maxOutputTokens": "64000"}, "generation_config": {
        "max_output_tokens": 64000}}, GEMINI),
])
def test_a_lowered_limit_is_what_the_request_then_asks_for(provider: str, kind: EndpointKind, body: dict[str, Any],
                                                             path: str) -> None:
    spec = SPEC[provider]
    adapter_for(spec.family).set_output_limit(kind, body, 300, spec.chat_limit_field)
    assert request_facts(spec, kind, body, path).max_output_tokens == 300


# --- the text of an answer without usage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, kind, body, text",
    [
        (F.OPENAI, K.CHAT, {"choices": [
            {"message": {"content": "Hello", "reasoning_content": " (thought)", "refusal": None,
                         "tool_calls": [{"function": {"name": "f", "arguments": '{"a":1}'}}]}},
            {"message": {"content": " second"}}, "junk"]}, 'Hello (thought){"a":1} second'),
        (F.OPENAI, K.COMPLETIONS, {"choices": [{"text": "Once"}, {"text": " upon"}]}, "Once upon"),
        (F.OPENAI, K.RESPONSES, {"output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "Hi"}, {"type": "refusal"}]},
            {"type": "function_call", "arguments": '{"q":"x"}'}]}, 'Hi{"q":"x"}'),
        (F.OPENAI, K.CHAT, {"choices": None}, ""),
        (F.ANTHROPIC, K.MESSAGES, {"content": [
            {"type": "thinking", "thinking": "hmm "}, {"type": "text", "text": "Hello"},
            {"type": "tool_use", "name": "f", "input": {"a": 1}}]}, 'hmm Hello{"a":1}'),
        (F.ANTHROPIC, K.MESSAGES, {"content": "not a list"}, ""),
        (F.GEMINI, K.CHAT, {"candidates": [
            {"content": {"parts": [{"text": "Hi"}, {"functionCall": {"name": "f", "args": {}}}]}},
            {"content": {"parts": [{"text": " two"}]}}]}, 'Hi{"name":"f","args":{}} two'),
        (F.GEMINI, K.CHAT, {}, ""),
    ],
)
def test_response_text(family: Family, kind: EndpointKind, body: dict[str, Any], text: str) -> None:
    assert adapter_for(family).response_text(kind, body) == text


# --- images and audio -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, kind", [(F.OPENAI, K.CHAT), (F.OPENAI, K.EMBEDDINGS), (F.OPENAI, K.RESPONSES),
                                          (F.ANTHROPIC, K.MESSAGES), (F.GEMINI, K.CHAT), (F.GEMINI, K.IMAGES)])
def test_text_endpoints_have_no_media_usage(family: Family, kind: EndpointKind) -> None:
    facts = RequestFacts("m", False, 100, 2)
    assert adapter_for(family).media_usage(kind, {"input": "x", "prompt": "y"}, (), facts, 10) is None


@pytest.mark.parametrize(
    "kind, body, uploads, facts, want",
    [
        (K.IMAGES, {"quality": "low", "size": "1024x1024"}, (), RequestFacts("gpt-image-1", False, None, 2),
         Usage(input_tokens=10, output_tokens=2 * 272, images=2)),
        (K.IMAGES, {"quality": "high", "size": "1024x1536"}, (Upload("image[]", "a.png", "image/png", 4096),
                                                              Upload("mask", "m.png", "image/png", 1023)),
         RequestFacts("gpt-image-1", False, None), Usage(input_tokens=10 + 5 + 1, output_tokens=6240, images=1)),
        (K.IMAGES, {"quality": "ultra"}, (), RequestFacts("chatgpt-image-latest", False, None),
         Usage(input_tokens=10, output_tokens=4160, images=1)),  # an unknown quality: the dearest
        (K.IMAGES, {}, (), RequestFacts("dall-e-3", False, None, 3), Usage(images=3)),
        (K.AUDIO, {"input": "abcd"}, (), RequestFacts("tts-1", False, None),
         Usage(input_tokens=10, output_tokens=8, output_audio_tokens=8, input_characters=4)),
        (K.AUDIO, {}, (Upload("file", "a.wav", "audio/wav", 10**6, audio_seconds=1.5),),
         RequestFacts("gpt-4o-transcribe", False, None),
         Usage(input_tokens=30 + 10, input_audio_tokens=30, output_tokens=8, audio_seconds=1.5)),
        (K.AUDIO, {}, (Upload("file", "a.m4a", "audio/mp4", 20_000),), RequestFacts("whisper-1", False, None),
         Usage(input_tokens=200 + 10, input_audio_tokens=200, output_tokens=50, audio_seconds=10.0)),
    ],
)
def test_openai_media_usage(kind: EndpointKind, body: dict[str, Any], uploads: tuple[Upload, ...],
                            facts: RequestFacts, want: Usage) -> None:
    assert adapter_for(F.OPENAI).media_usage(kind, body, uploads, facts, 10) == want


@pytest.mark.parametrize(
    "kind, body, usage",
    [
        # gpt-image: tokens, and the images made.
        (K.IMAGES, {"created": 1, "data": [{"b64_json": "AA"}, {"b64_json": "BB"}], "usage": {
            "total_tokens": 8370, "input_tokens": 50, "output_tokens": 8320,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}},
         Usage(input_tokens=50, output_tokens=8320, images=2)),
        # DALL-E: no usage; billed per image.
        (K.IMAGES, {"created": 1, "data": [{"url": "https://x/1.png"}]}, Usage(images=1)),
        (K.IMAGES, {"created": 1, "data": []}, None),
        (K.IMAGES, {"created": 1, "data": "junk"}, None),
        # whisper-1: the audio's length.
        (K.AUDIO, {"text": "hi", "usage": {"type": "duration", "seconds": 7}}, Usage(audio_seconds=7.0)),
        (K.AUDIO, {"text": "hi", "usage": {"type": "duration", "seconds": -7}}, Usage()),
        (K.AUDIO, {"text": "hi", "usage": {"type": "duration", "seconds": True}}, Usage()),
        (K.AUDIO, {"text": "hi", "usage": {"type": "duration", "seconds": 1e12}}, Usage()),
        # gpt-4o-transcribe: tokens, the audio part named in input_token_details.
        (K.AUDIO, {"text": "hi", "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 45,
                                           "total_tokens": 59, "input_token_details": {"text_tokens": 2,
                                                                                       "audio_tokens": 12}}},
         Usage(input_tokens=14, output_tokens=45, input_audio_tokens=12)),
        (K.AUDIO, {"text": "no usage"}, None),
    ],
)
def test_openai_media_answers(kind: EndpointKind, body: dict[str, Any], usage: Usage | None) -> None:
    assert usage_from_json(F.OPENAI, kind, body) == usage


# --- the WebSocket protocols' usage blocks ----------------------------------------------------------------------


def test_realtime_usage_with_its_token_details() -> None:
    raw = {"total_tokens": 300, "input_tokens": 200, "output_tokens": 100,
           "input_token_details": {"text_tokens": 60, "audio_tokens": 140, "image_tokens": 0, "cached_tokens": 50,
                                   "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 0}},
           "output_token_details": {"text_tokens": 20, "audio_tokens": 80}}
    assert adapter_for(F.OPENAI).usage(raw, "gpt-realtime", "resp_1") == Usage(
        input_tokens=200, output_tokens=100, cache_read_tokens=50, model_reported="gpt-realtime",
        upstream_request_id="resp_1", input_audio_tokens=140, output_audio_tokens=80)
    done = {"id": "resp_1", "model": "gpt-realtime", "usage": raw}  # response.done, as the stage hands it on
    assert usage_from_json(F.OPENAI, K.REALTIME, done) == adapter_for(F.OPENAI).usage(raw, "gpt-realtime", "resp_1")


@pytest.mark.parametrize("raw, out", [
    ({"promptTokenCount": 12, "responseTokenCount": 5}, 5),  # Gemini Live
    ({"promptTokenCount": 12, "responseTokenCount": 5, "thoughtsTokenCount": 3}, 8),
    ({"promptTokenCount": 12, "candidatesTokenCount": 7, "responseTokenCount": 5}, 7),
    ({"promptTokenCount": 12, "candidatesTokenCount": 0, "responseTokenCount": 5}, 5),
    ({"promptTokenCount": 12}, 0),
])
def test_gemini_live_usage(raw: dict[str, Any], out: int) -> None:
    u = usage_from_json(F.GEMINI, K.REALTIME, {"usageMetadata": raw, "modelVersion": "gemini-live-2.5-flash"})
    assert u is not None and (u.input_tokens, u.output_tokens, u.model_reported) == (12, out, "gemini-live-2.5-flash")
