"""spendgate.stages.estimate: what a request will bill before it is sent, as the caps reserve it:
every answer asked for, thinking budgets, the default output limit, embeddings (no output), and
images and audio by the units their models bill (the adapters' `media_usage`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from spendgate.providers import request_facts
from spendgate.providers.tokens import estimate_input_tokens
from spendgate.providers.wire import EndpointKind, RequestFacts, Upload, Usage
from spendgate.stages.call import OFF_LOOP_BYTES, Call
from spendgate.stages.estimate import MAX_OUTPUT_TOKENS, Estimator, clampable
from spendgate.testing import tcall, tprovider

K = EndpointKind
DEFAULT = 4096
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hi."}]}


def usage(call: Call, default: int = DEFAULT) -> Usage:
    return asyncio.run(Estimator(default).usage(call))


def prompt(call: Call) -> int:
    assert call.body is not None
    return estimate_input_tokens(call.provider.spec.family, call.endpoint_kind, call.body, call.model_requested)


@pytest.mark.parametrize(
    "fields, per_choice",
    [
        ({"max_output_tokens": 100}, 100),
        ({}, DEFAULT),  # no limit asked: the default
        ({"thinking_budget": 2048}, DEFAULT + 2048),  # thinking on top of the default answer
        ({"max_output_tokens": 100, "thinking_budget": 2048}, 100),  # the limit covers thinking too
        ({"max_output_tokens": 0}, 0),  # a warm-up
        # A negative limit is "none" to some parsers: held at the default (and sent with it), never at 0.
        ({"max_output_tokens": -100_000}, DEFAULT),
        ({"max_output_tokens": -1, "thinking_budget": 10}, DEFAULT + 10),
        ({"max_output_tokens": 10**15}, MAX_OUTPUT_TOKENS),  # nor one that overflows a column
    ],
)
def test_output_per_choice(fields: dict[str, Any], per_choice: int) -> None:
    call = tcall(body=CHAT, **fields)
    assert Estimator(DEFAULT).output_per_choice(call) == per_choice


@pytest.mark.parametrize("choices", [1, 2, 10, 128])
def test_every_answer_asked_for_is_counted(choices: int) -> None:
    call = tcall(body=CHAT, max_output_tokens=500, choices=choices)
    assert usage(call) == Usage(input_tokens=prompt(call), output_tokens=500 * choices)


def test_the_default_limit_is_the_estimator_s() -> None:
    call = tcall(body=CHAT)
    assert usage(call, default=64).output_tokens == 64
    assert usage(call, default=8000).output_tokens == 8000


def test_the_prompt_is_counted_with_the_provider_s_adapter() -> None:
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 2000}]}
    short, big = tcall(body=CHAT, max_output_tokens=1), tcall(body=long, max_output_tokens=1)
    assert usage(short).input_tokens == prompt(short) < 50
    assert usage(big).input_tokens == prompt(big) > 2000


def test_a_large_body_is_counted_off_the_event_loop_with_the_same_result() -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "word " * 30_000}]}
    small, large = tcall(body=body, max_output_tokens=1), tcall(body=body, max_output_tokens=1)
    large.request_bytes = OFF_LOOP_BYTES + 1
    assert usage(small) == usage(large)


@pytest.mark.parametrize("provider, kind, body, fields", [
    ("openai", K.EMBEDDINGS, {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}, {}),
    ("openai", K.EMBEDDINGS, {"model": "text-embedding-3-small", "input": "x"}, {"max_output_tokens": 500}),
    ("gemini", K.EMBEDDINGS, {"content": {"parts": [{"text": "alpha"}]}}, {"choices": 3}),
])
def test_embeddings_bill_their_input_only(provider: str, kind: EndpointKind, body: dict[str, Any],
                                          fields: dict[str, Any]) -> None:
    call = tcall(provider=tprovider(provider), kind=kind, body=body, **fields)
    got = usage(call)
    assert got.output_tokens == 0 and got.input_tokens == prompt(call) > 0


@pytest.mark.parametrize("kind, body", [
    (K.OTHER, CHAT), (K.MODELS, None), (K.FILES, {"purpose": "batch"}), (K.BATCHES, {"input_file_id": "f"}),
    (K.CHAT, None),
])
def test_what_is_not_metered_estimates_nothing(kind: EndpointKind, body: dict[str, Any] | None) -> None:
    assert usage(tcall(kind=kind, body=body, max_output_tokens=500)) == Usage()


# --- images and audio: what their models bill ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body, choices, uploads, want",
    [
        # gpt-image: output tokens per image by quality and size, times n.
        ({"model": "gpt-image-1", "prompt": "a cat", "quality": "low", "size": "1024x1024"}, 1, (),
         {"output_tokens": 272, "images": 1}),
        ({"model": "gpt-image-1", "prompt": "a cat", "quality": "medium", "size": "1536x1024"}, 4, (),
         {"output_tokens": 4 * 1584, "images": 4}),
        ({"model": "gpt-image-1", "prompt": "a cat"}, 1, (), {"output_tokens": 4160, "images": 1}),  # high, square
        # An edit's input images are input tokens (1 + size / 1 KiB each), beside the prompt.
        ({"model": "gpt-image-1", "prompt": "add a hat", "quality": "low"}, 1,
         (Upload("image", "cat.png", "image/png", 10 * 1024), Upload("image[]", "b.png", "image/png", 0)),
         {"output_tokens": 272, "images": 1, "extra_input": 11 + 1}),
        # DALL-E: billed per image.
        ({"model": "dall-e-3", "prompt": "a cat", "n": 1}, 1, (), {"images": 1, "no_prompt": True}),
        ({"model": "dall-e-2", "prompt": "a cat", "n": 3}, 3, (), {"images": 3, "no_prompt": True}),
    ],
)
def test_images_are_estimated_by_what_their_models_bill(body: dict[str, Any], choices: int,
                                                        uploads: tuple[Upload, ...], want: dict[str, Any]) -> None:
    call = tcall(kind=K.IMAGES, body=body, choices=choices, uploads=uploads)
    got = usage(call)
    assert (got.output_tokens, got.images) == (want.get("output_tokens", 0), want["images"])
    if want.get("no_prompt"):
        assert got.input_tokens == 0
    else:
        assert got.input_tokens == prompt(call) + want.get("extra_input", 0)


def test_speech_is_estimated_by_its_characters() -> None:
    text = "Hello there, how are you today?"
    call = tcall(kind=K.AUDIO, body={"model": "tts-1-hd", "input": text, "voice": "alloy"})
    got = usage(call)
    assert (got.input_characters, got.output_tokens, got.output_audio_tokens) == (len(text), 2 * len(text),
                                                                                 2 * len(text))
    assert got.input_tokens == prompt(call)


@pytest.mark.parametrize(
    "uploads, seconds",
    [
        ((Upload("file", "a.wav", "audio/wav", 320_044, audio_seconds=10.0),), 10.0),  # its header says
        ((Upload("file", "a.mp3", "audio/mpeg", 60_000),), 30.0),  # else its size, at 16 kbit/s
        ((Upload("file", "a.wav", "audio/wav", 100, audio_seconds=2.5),
          Upload("file", "b.mp3", "audio/mpeg", 4000)), 4.5),  # every file part
        # Any file part, whatever it is named: the provider's form parser may read a name the gateway's did not.
        ((Upload("", "x.mp3", "audio/mpeg", 60_000),), 30.0),
        ((), 0.0),
    ],
)
def test_transcriptions_are_estimated_by_their_audio_s_length(uploads: tuple[Upload, ...], seconds: float) -> None:
    call = tcall(kind=K.AUDIO, body={"model": "gpt-4o-transcribe"}, uploads=uploads)
    got = usage(call)
    assert got.audio_seconds == seconds
    assert got.input_audio_tokens == math.ceil(seconds * 20)  # transcription models: ~10 audio tokens a second, x2
    assert got.input_tokens == got.input_audio_tokens + prompt(call)
    assert got.output_tokens == math.ceil(seconds * 5)


@pytest.mark.parametrize("provider, kind", [("anthropic", K.MESSAGES), ("gemini", K.CHAT)])
def test_families_without_media_endpoints_estimate_text(provider: str, kind: EndpointKind) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    call = tcall(provider=tprovider(provider), kind=kind, body=body, max_output_tokens=300, choices=2)
    assert usage(call) == Usage(input_tokens=prompt(call), output_tokens=600)


def test_facts_are_what_the_call_asks_for() -> None:
    call = tcall(body={**CHAT, "stream": True}, max_output_tokens=77, choices=3, thinking_budget=12)
    assert Estimator(DEFAULT).facts(call) == RequestFacts("gpt-4o", True, 77, 3, 12)


def test_with_output_replaces_only_the_output() -> None:
    base = Usage(input_tokens=10, output_tokens=999, cache_read_tokens=3, images=1)
    assert Estimator.with_output(base, 7, 3) == Usage(input_tokens=10, output_tokens=21, cache_read_tokens=3, images=1)


@pytest.mark.parametrize("kind, body, uploads, can", [
    (K.CHAT, CHAT, (), True), (K.RESPONSES, CHAT, (), True), (K.MESSAGES, CHAT, (), True),
    (K.COMPLETIONS, CHAT, (), True),
    (K.CHAT, None, (), False),  # no body the gateway can rewrite
    (K.EMBEDDINGS, CHAT, (), False), (K.IMAGES, CHAT, (), False), (K.AUDIO, CHAT, (), False),
    (K.REALTIME, CHAT, (), False),
    (K.CHAT, CHAT, (Upload("file", None, "application/octet-stream", 1),), False),  # a form is not re-encoded
])
def test_clampable(kind: EndpointKind, body: dict[str, Any] | None, uploads: tuple[Upload, ...], can: bool) -> None:
    assert clampable(tcall(kind=kind, body=body, uploads=uploads)) is can


def test_a_gemini_thinking_budget_comes_from_its_request() -> None:
    gemini = tprovider("gemini")
    body = {"contents": [], "generationConfig": {"thinkingConfig": {"thinkingBudget": 8192}}}
    facts = request_facts(gemini.spec, K.CHAT, body, "/v1beta/models/gemini-2.5-pro:generateContent")
    assert (facts.model, facts.max_output_tokens, facts.thinking_budget) == ("gemini-2.5-pro", None, 8192)
    call = tcall(provider=gemini, body=body, model_requested=facts.model, thinking_budget=facts.thinking_budget)
    assert usage(call).output_tokens == DEFAULT + 8192
