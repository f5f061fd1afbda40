"""spendgate.providers.tokens: token estimates from cached tiktoken encodings only (never a download),
bytes / 4 without one, and what each family's prompt adds up to."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spendgate.providers import tokens
from spendgate.providers.tokens import IMAGE_TOKENS, count_text, encoding_for, estimate_input_tokens
from spendgate.providers.wire import EndpointKind, Family

F, K = Family, EndpointKind
CACHE = "/work/shared/tiktoken-cache"
needs_cache = pytest.mark.skipif(
    not tokens._cached_blob_ok("o200k_base"), reason="tiktoken cache not available (set TIKTOKEN_CACHE_DIR)"
)


@pytest.fixture
def no_encodings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No cached encoding files, and any network attempt fails the test."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_loaded", {})

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tiktoken tried to download")

    monkeypatch.setattr("tiktoken.load.read_file", no_network)
    yield


@needs_cache
@pytest.mark.parametrize(
    "model, name",
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),  # Azure's spelling
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
        ("gemini-2.5-flash", "o200k_base"),
        ("mistral-large-latest", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_for(model: str | None, name: str) -> None:
    enc = encoding_for(model)
    assert enc is not None and enc.name == name
    assert encoding_for(model) is enc  # cached


@needs_cache
def test_count_text_with_special_tokens() -> None:
    # (count_text's answer is always an estimate; it no longer says so in a second value nobody read)
    n = count_text("hello <|endoftext|> world", "gpt-4o")
    assert isinstance(n, int) and n > 3
    assert count_text("", "gpt-4o") == 0
    assert count_text("hello world", "gpt-4o") == 2


def test_without_encodings_falls_back_and_never_downloads(no_encodings: None) -> None:
    assert encoding_for("gpt-4o") is None
    assert tokens.available_encodings() == []
    assert count_text("abcdefghi", "gpt-4o") == 3  # ceil(9 / 4)
    assert count_text("é" * 3, "claude-3") == 2  # 6 bytes


def test_a_corrupt_cache_file_is_not_trusted(no_encodings: None) -> None:
    url, _ = tokens._BLOBS["o200k_base"]
    Path(os.environ["TIKTOKEN_CACHE_DIR"], hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"garbage")
    assert encoding_for("gpt-4o") is None


def test_empty_cache_dir_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setattr(tokens, "_loaded", {})
    assert encoding_for("gpt-4o") is None


@needs_cache
def test_falls_back_to_the_other_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_loaded", {"o200k_base": None})
    enc = encoding_for("gpt-4o")
    assert enc is not None and enc.name == "cl100k_base"


def _text_tokens(text: str, model: str = "gpt-4o") -> int:
    return count_text(text, model)


@needs_cache
def test_openai_chat_messages() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}},
                ],
            },
        ],
    }
    n = estimate_input_tokens(F.OPENAI, K.CHAT, body, "gpt-4o")
    expected_text = _text_tokens("You are terse.\nWhat is this?")
    assert n == expected_text + 2 * 3 + 3 + IMAGE_TOKENS


@needs_cache
def test_openai_chat_counts_tools_and_tool_calls() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = {
        **base,
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    }
    assert (estimate_input_tokens(F.OPENAI, K.CHAT, with_tools, "gpt-4o")
            > estimate_input_tokens(F.OPENAI, K.CHAT, base, "gpt-4o") + 10)
    calls = {
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    }
    assert estimate_input_tokens(F.OPENAI, K.CHAT, calls, "gpt-4o") >= _text_tokens('f\n{"city": "Paris"}\nsunny') + 9


@needs_cache
@pytest.mark.parametrize(
    "family, kind, body, text, overhead",
    [
        (F.OPENAI, K.RESPONSES, {"input": "Tell me a joke", "instructions": "Be brief"}, "Be brief\nTell me a joke",
         0),
        (
            F.OPENAI,
            K.RESPONSES,
            {"input": [{"role": "user", "content": [
                {"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "hi",
            3 + 3 + IMAGE_TOKENS,
        ),
        (F.OPENAI, K.COMPLETIONS, {"prompt": "Once upon a time"}, "Once upon a time", 0),
        (F.OPENAI, K.COMPLETIONS, {"prompt": [1, 2, 3, 4]}, "", 4),
        (F.OPENAI, K.EMBEDDINGS, {"input": ["alpha", "beta"]}, "alpha\nbeta", 0),
        (F.OPENAI, K.EMBEDDINGS, {"input": [[1, 2], [3]]}, "", 3),
        (
            F.ANTHROPIC,
            K.MESSAGES,
            {
                "system": [{"type": "text", "text": "Be nice", "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "image",
                         "source": {"type": "base64", "media_type": "image/png", "data": "QUJD" * 1000}},
                        {"type": "text", "text": "Describe"}]},
                    {"role": "assistant", "content": "Sure"},
                ],
            },
            "Be nice\nDescribe\nSure",
            2 * 3 + 3 + IMAGE_TOKENS,
        ),
        (
            F.GEMINI,
            K.CHAT,
            {
                "systemInstruction": {"parts": [{"text": "Be nice"}]},
                "contents": [
                    {"role": "user", "parts": [
                        {"text": "Hello"}, {"inlineData": {"mimeType": "image/jpeg", "data": "AAAA" * 1000}}]},
                    {"role": "model", "parts": [{"text": "Hi"}]},
                ],
            },
            "Be nice\nHello\nHi",
            2 * 3 + IMAGE_TOKENS,
        ),
        (F.ANTHROPIC, K.OTHER, {"messages": [{"role": "user", "content": "x" * 100}]}, "", 0),
        (F.OPENAI, K.OTHER, {"input": "x" * 100}, "", 0),
    ],
)
def test_estimate_input_tokens(family: Family, kind: EndpointKind, body: dict[str, Any], text: str,
                               overhead: int) -> None:
    assert estimate_input_tokens(family, kind, body, "gpt-4o") == _text_tokens(text) + overhead


def test_estimate_without_encodings(no_encodings: None) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert estimate_input_tokens(F.OPENAI, K.CHAT, body, "gpt-4o") == 100 + 3 + 3


@needs_cache
def test_a_megabyte_prompt_is_counted_in_reasonable_time() -> None:
    text = ("The quick brown fox jumps over the lazy dog; ünïcødé 12345.\n" * 20_000)[:1_000_000]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    encoding_for("gpt-4o")
    start = time.perf_counter()
    n = estimate_input_tokens(F.OPENAI, K.CHAT, body, "gpt-4o")
    elapsed = time.perf_counter() - start
    assert n > 200_000
    assert elapsed < 2.0, elapsed


def test_deeply_nested_bodies_do_not_raise() -> None:
    deep: Any = "x"
    for _ in range(900):
        deep = {"content": [deep]}
    body = {"messages": [deep], "tools": [deep]}
    assert estimate_input_tokens(F.OPENAI, K.CHAT, body, "gpt-4o") >= 0
