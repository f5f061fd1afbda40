"""Token estimates, for budgeting before a request goes out and for streams cut off early.

tiktoken downloads its encoding files on first use; the gateway must never block on that.
We only ask tiktoken for an encoding whose file is already in its cache (checked by name and
sha256 first), and remember failures. Without any encoding we fall back to bytes / 4.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import tiktoken

from spendgate.providers import prompt_of
from spendgate.providers.wire import EndpointKind, Family

__all__ = [
    "IMAGE_TOKENS", "available_encodings", "count_text", "encoding_files", "encoding_for", "estimate_input_tokens",
]

# (download URL, sha256) exactly as tiktoken_ext.openai_public names them; tiktoken's cache file
# is sha1(URL) inside TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR, or <tmp>/data-gym-cache).
_BLOBS: Mapping[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Flat allowance per image / audio / file part: we never decode media. 1024 is above OpenAI's
# high-detail 1024px tile cost (765) and near Anthropic's ~1.6k for a 1.15 MP image.
IMAGE_TOKENS = 1024

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding | None] = {}

_O200K = re.compile(r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|o\d|codex|omni-)")
_CL100K = re.compile(r"^(gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada|davinci-002|babbage-002)")


def _cache_dir() -> str:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached_blob_ok(name: str) -> bool:
    url, sha256 = _BLOBS[name]
    cache_dir = _cache_dir()
    if not cache_dir:
        return False  # caching disabled: tiktoken would always download
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    # A mismatching file makes tiktoken delete it and download again.
    return hashlib.sha256(data).hexdigest() == sha256


def _load(name: str) -> tiktoken.Encoding | None:
    try:
        return _loaded[name]
    except KeyError:
        pass
    with _lock:
        if name in _loaded:
            return _loaded[name]
        enc: tiktoken.Encoding | None = None
        if _cached_blob_ok(name):
            try:
                enc = tiktoken.get_encoding(name)
            except Exception:  # noqa: BLE001 - any failure means "estimate by bytes"
                enc = None
        _loaded[name] = enc
        return enc


def _encoding_name(model: str | None) -> str:
    if not model:
        return "o200k_base"
    m = model.lower().rsplit("/", 1)[-1]  # openrouter-style "openai/gpt-4o"
    if _O200K.match(m):
        return "o200k_base"
    if _CL100K.match(m):
        return "cl100k_base"
    return "o200k_base"  # claude, gemini, mistral, …: an approximation, not their tokenizer


def encoding_for(model: str | None) -> tiktoken.Encoding | None:
    """The tiktoken encoding for `model`, another one if that is unavailable, else None.
    Never raises and never touches the network."""
    preferred = _encoding_name(model)
    enc = _load(preferred)
    if enc is not None:
        return enc
    for other in _BLOBS:
        if other != preferred and (enc := _load(other)) is not None:
            return enc
    return None


def available_encodings() -> list[str]:
    """For `spendgate doctor`: the encodings that load from the local cache."""
    return [name for name in _BLOBS if _load(name) is not None]


def encoding_files() -> dict[str, tuple[str, str]]:
    """For `spendgate doctor`: each encoding's (download URL, the file tiktoken's cache expects)."""
    return {name: (url, os.path.join(_cache_dir(), hashlib.sha1(url.encode()).hexdigest()))
            for name, (url, _) in _BLOBS.items()}


def count_text(text: str, model: str | None) -> int:
    """Tokens in `text`: an estimate (a tokenizer's count is still not the provider's bill);
    without an encoding it is ceil(utf-8 bytes / 4)."""
    if not text:
        return 0
    enc = encoding_for(model)
    if enc is None:
        n = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
        return math.ceil(n / 4)
    return len(enc.encode(text, disallowed_special=()))


def estimate_input_tokens(
    family: Family, kind: EndpointKind, body: Mapping[str, Any], model: str | None
) -> int:
    """Prompt tokens a request will be billed for, roughly; 0 for endpoints without a prompt.

    CPU-bound on large prompts (~1 MB of text takes tens of ms): callers on the event loop use
    `asyncio.to_thread`.
    """
    prompt = prompt_of(family, kind, body)
    if prompt is None:
        return 0
    return count_text(prompt.text, model) + prompt.overhead + prompt.media * IMAGE_TOKENS
