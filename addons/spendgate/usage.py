"""Token usage from provider responses, streamed or not, and the request facts pricing needs.

Pure: bytes and dicts in, values out. Counts follow genai-prices' conventions so a `Usage`
can be handed to `genai_prices.calc_price` unchanged: `input_tokens` is the TOTAL input
(cache reads and writes included), `output_tokens` includes reasoning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from spendgate.sse import SSEEvent, SSEParser

__all__ = [
    "EndpointKind",
    "Family",
    "RequestFacts",
    "StreamTap",
    "Usage",
    "UsageSource",
    "add_include_usage",
    "endpoint_kind_for",
    "request_facts",
    "usage_from_json",
]


class EndpointKind(StrEnum):
    CHAT = "chat"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    OTHER = "other"


class Family(StrEnum):
    # Wire format family; azure, mistral, groq, deepseek, openrouter, xai, together speak OPENAI.
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


class UsageSource(StrEnum):
    PROVIDER = "provider"
    ESTIMATED = "estimated"


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0  # TOTAL input tokens, including cache reads and cache writes (genai-prices' convention)
    output_tokens: int = 0  # including reasoning tokens
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model_reported: str | None = None
    upstream_request_id: str | None = None  # response id if present (e.g. chatcmpl-…, msg_…); optional


@dataclass(frozen=True)
class RequestFacts:
    model: str | None
    stream: bool
    max_output_tokens: int | None


JSON = dict[str, Any]


def _int(value: object) -> int:
    # bool is an int subclass; a provider never means True as a token count.
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value >= 0 and value == value and value != float("inf"):
        return int(value)
    return 0


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------------------------
# usage objects, one converter per wire shape


def _openai_usage(u: Mapping[str, Any], model: str | None, rid: str | None) -> Usage:
    """Chat / completions / embeddings (`prompt_tokens`) or responses (`input_tokens`) shape."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        inp = _int(u.get("prompt_tokens"))
        out = _int(u.get("completion_tokens"))
        in_details = _dict(u.get("prompt_tokens_details"))
        out_details = _dict(u.get("completion_tokens_details"))
        cache_read = _int(in_details.get("cached_tokens"))
        if not cache_read:
            # DeepSeek reports its cache as hit/miss counts; prompt_tokens already includes both.
            cache_read = _int(u.get("prompt_cache_hit_tokens"))
    else:
        inp = _int(u.get("input_tokens"))
        out = _int(u.get("output_tokens"))
        in_details = _dict(u.get("input_tokens_details"))
        out_details = _dict(u.get("output_tokens_details"))
        cache_read = _int(in_details.get("cached_tokens"))
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cache_read,
        cache_write_tokens=_int(in_details.get("cache_write_tokens")),
        reasoning_tokens=_int(out_details.get("reasoning_tokens")),
        model_reported=model,
        upstream_request_id=rid,
    )


def _anthropic_usage(u: Mapping[str, Any], model: str | None, rid: str | None) -> Usage:
    # Anthropic's input_tokens excludes the cached part; genai-prices' includes it.
    cache_write = _int(u.get("cache_creation_input_tokens"))
    cache_read = _int(u.get("cache_read_input_tokens"))
    return Usage(
        input_tokens=_int(u.get("input_tokens")) + cache_write + cache_read,
        output_tokens=_int(u.get("output_tokens")),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        model_reported=model,
        upstream_request_id=rid,
    )


def _gemini_usage(u: Mapping[str, Any], model: str | None, rid: str | None) -> Usage:
    # candidatesTokenCount excludes thoughts; promptTokenCount includes cached content but not
    # tool-use prompt tokens (genai-prices adds those to input too).
    thoughts = _int(u.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=_int(u.get("promptTokenCount")) + _int(u.get("toolUsePromptTokenCount")),
        output_tokens=_int(u.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=_int(u.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        model_reported=model,
        upstream_request_id=rid,
    )


def usage_from_json(family: Family, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
    """Usage from a non-streamed response body; None if it reports none."""
    if not isinstance(body, Mapping):
        return None
    if family is Family.GEMINI:
        u = body.get("usageMetadata")
        if not isinstance(u, dict):
            return None
        return _gemini_usage(u, _str(body.get("modelVersion")), _str(body.get("responseId")))
    model, rid = _str(body.get("model")), _str(body.get("id"))
    u = body.get("usage")
    if family is Family.ANTHROPIC:
        return _anthropic_usage(u, model, rid) if isinstance(u, dict) else None
    if not isinstance(u, dict):
        # Groq has reported stream usage under x_groq.
        u = _dict(body.get("x_groq")).get("usage")
        if not isinstance(u, dict):
            return None
    return _openai_usage(u, model, rid)


# ---------------------------------------------------------------------------------------------
# streams

OUTPUT_TEXT_LIMIT = 64 * 1024

# OpenAI adds `"usage":null` to every chunk once include_usage is set; this is that span.
_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_NULL_BEFORE = re.compile(rb'"usage"\s*:\s*null\s*,')
_JSON_TOKENS = re.compile(rb'["\\{}\[\]]')


class StreamTap:
    """Watches one streamed response and reports what the provider said it used.

    `feed` returns the bytes to forward. Observe-only unless `strip_usage_chunk` (OpenAI chat /
    completions only, meaning the gateway itself set `stream_options.include_usage`): then the
    usage-only chunk is removed and the `,"usage":null` span OpenAI adds to every other chunk is
    cut out, so the client gets what it would have got without include_usage. Each event is
    forwarded as soon as it is complete; only an unfinished event is held back.
    """

    def __init__(self, family: Family, kind: EndpointKind, strip_usage_chunk: bool = False) -> None:
        self.family = family
        self.kind = kind
        self.strip = strip_usage_chunk and family is Family.OPENAI and kind in (
            EndpointKind.CHAT,
            EndpointKind.COMPLETIONS,
        )
        self.completed = False
        self.output_text_bytes = 0
        self._text: list[str] = []
        self._text_len = 0
        self._parser = SSEParser()
        self._held = bytearray()
        self._cr_owner: bool | None = None
        self._verbatim = False
        self._raw_usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._id: str | None = None
        self._mode: str | None = None if family is Family.GEMINI else "sse"
        self._json = _JsonArraySplitter()

    @property
    def usage(self) -> Usage | None:
        u = self._raw_usage
        if u is None:
            return None
        if self.family is Family.ANTHROPIC:
            return _anthropic_usage(u, self._model, self._id)
        if self.family is Family.GEMINI:
            return _gemini_usage(u, self._model, self._id)
        return _openai_usage(u, self._model, self._id)

    @property
    def output_text(self) -> str:
        """Generated text seen so far, at most OUTPUT_TEXT_LIMIT bytes of it (for estimates)."""
        return "".join(self._text)

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward for `chunk`. `b""` means end of stream (as mitmproxy's stream
        callback is told) and releases anything held back."""
        if not chunk:
            return self.flush()
        if self._mode is None:
            # Gemini streams SSE with ?alt=sse, else one JSON array delivered piecemeal.
            head = chunk.lstrip()
            if not head:
                return chunk
            self._mode = "json" if head[:1] == b"[" else "sse"
        if self._mode == "json":
            for obj in self._json.feed(chunk):
                self._observe_json(obj)
            return chunk
        if not self.strip:
            for event in self._parser.feed(chunk):
                self._observe(event)
            return chunk
        return self._feed_strip(chunk)

    def flush(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        if held:
            # Should more of that event still come (an empty HTTP/2 DATA frame mid-stream looks
            # like the end), it must go out verbatim: half an event stripped would corrupt it.
            self._verbatim = True
        return held

    def _feed_strip(self, chunk: bytes) -> bytes:
        out = bytearray()
        skew = 0
        if self._cr_owner is not None:
            # The previous chunk ended an event with a bare CR; a leading LF completes that CRLF
            # and shares the fate (forwarded or dropped) of the event it ends.
            keep, self._cr_owner = self._cr_owner, None
            if chunk[:1] == b"\n":
                skew = 1
                if keep:
                    out += b"\n"
        forward = chunk[skew:] if skew else chunk
        start = 0
        for end, event in self._parser.feed_boundaries(chunk):
            end -= skew
            raw = bytes(self._held) + forward[start:end] if self._held else forward[start:end]
            self._held.clear()
            start = end
            keep = True
            obj = self._observe(event) if event is not None else None
            if self._verbatim:
                self._verbatim = False
            elif obj is not None:
                if _is_usage_only_chunk(obj):
                    keep = False
                elif "usage" in obj and obj["usage"] is None:
                    raw = _cut_usage_null(raw)
            if keep:
                out += raw
            if end == len(forward) and raw.endswith(b"\r"):
                self._cr_owner = keep
        self._held += forward[start:]
        return bytes(out)

    def _observe(self, event: SSEEvent) -> dict[str, Any] | None:
        data = event.data
        if data == "[DONE]":
            self.completed = True
            return None
        if not data or data[0] != "{":
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        self._observe_json(obj)
        return obj

    def _observe_json(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        if self.family is Family.ANTHROPIC:
            self._anthropic(obj)
        elif self.family is Family.GEMINI:
            self._gemini(obj)
        elif self.kind is EndpointKind.RESPONSES or str(obj.get("type", "")).startswith("response."):
            self._responses(obj)
        else:
            self._openai_chunk(obj)

    def _openai_chunk(self, obj: Mapping[str, Any]) -> None:
        self._model = _str(obj.get("model")) or self._model
        self._id = _str(obj.get("id")) or self._id
        u = obj.get("usage")
        if not isinstance(u, dict):
            u = _dict(obj.get("x_groq")).get("usage")
        if isinstance(u, dict):
            self._raw_usage = u
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self._add_text(choice.get("text"))  # completions
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            self._add_text(delta.get("content"))
            self._add_text(delta.get("reasoning_content"))  # DeepSeek et al.
            self._add_text(delta.get("reasoning"))
            self._add_text(delta.get("refusal"))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = _dict(call).get("function")
                    self._add_text(_dict(fn).get("arguments"))

    def _responses(self, obj: Mapping[str, Any]) -> None:
        etype = obj.get("type")
        if not isinstance(etype, str):
            return
        if etype.endswith(".delta"):
            if "audio" not in etype:
                self._add_text(obj.get("delta"))
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        self._model = _str(response.get("model")) or self._model
        self._id = _str(response.get("id")) or self._id
        u = response.get("usage")
        if isinstance(u, dict):
            self._raw_usage = u
        # `incomplete` is a proper end too (e.g. max_output_tokens reached); `failed` is not.
        if etype in ("response.completed", "response.incomplete"):
            self.completed = True

    def _anthropic(self, obj: Mapping[str, Any]) -> None:
        etype = obj.get("type")
        if etype == "content_block_delta":
            delta = _dict(obj.get("delta"))
            self._add_text(delta.get("text"))
            self._add_text(delta.get("thinking"))
            self._add_text(delta.get("partial_json"))
        elif etype == "message_start":
            message = _dict(obj.get("message"))
            self._model = _str(message.get("model")) or self._model
            self._id = _str(message.get("id")) or self._id
            u = message.get("usage")
            if isinstance(u, dict):
                self._raw_usage = dict(u)
        elif etype == "message_delta":
            # Counts here are cumulative: the latest value replaces the earlier one.
            u = obj.get("usage")
            if isinstance(u, dict):
                merged = dict(self._raw_usage or {})
                merged.update((k, v) for k, v in u.items() if v is not None)
                self._raw_usage = merged
        elif etype == "message_stop":
            self.completed = True

    def _gemini(self, obj: Mapping[str, Any]) -> None:
        self._model = _str(obj.get("modelVersion")) or self._model
        self._id = _str(obj.get("responseId")) or self._id
        u = obj.get("usageMetadata")
        if isinstance(u, dict):
            self._raw_usage = u
        candidates = obj.get("candidates")
        if not isinstance(candidates, list):
            return
        for cand in candidates:
            if not isinstance(cand, dict):
                continue
            if cand.get("finishReason"):
                self.completed = True
            parts = _dict(cand.get("content")).get("parts")
            if isinstance(parts, list):
                for part in parts:
                    part = _dict(part)
                    self._add_text(part.get("text"))
                    if "functionCall" in part:
                        self._add_text(json.dumps(part["functionCall"], separators=(",", ":")))

    def _add_text(self, text: object) -> None:
        if not isinstance(text, str) or not text:
            return
        n = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
        self.output_text_bytes += n
        room = OUTPUT_TEXT_LIMIT - self._text_len
        if room <= 0:
            return
        if n > room:
            text = text.encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
            n = room
        self._text.append(text)
        self._text_len += n


def _is_usage_only_chunk(obj: Mapping[str, Any]) -> bool:
    if not isinstance(obj.get("usage"), dict):
        return False
    choices = obj.get("choices")
    if choices == []:
        return True
    # Some OpenAI-compatible servers send one content-free choice alongside the usage.
    return isinstance(choices, list) and all(
        isinstance(c, dict)
        and not c.get("delta")
        and not c.get("text")
        and c.get("finish_reason") is None
        and c.get("logprobs") is None
        for c in choices
    )


def _cut_usage_null(raw: bytes) -> bytes:
    # A `"` inside a JSON string is always escaped, so this span can only be the key itself.
    # The top-level key follows `choices`, so the last match is the one OpenAI added.
    matches = list(_USAGE_NULL_AFTER.finditer(raw)) or list(_USAGE_NULL_BEFORE.finditer(raw))
    if not matches:
        return raw
    m = matches[-1]
    return raw[: m.start()] + raw[m.end() :]


class _JsonArraySplitter:
    """Cuts the top-level objects out of a JSON array that arrives in pieces (Gemini without
    ?alt=sse). Only brackets, braces, quotes and backslashes are looked at."""

    def __init__(self) -> None:
        self._buf = bytearray()  # from the start of the unfinished element, if any
        self._depth = 0  # 0: outside the array, 1: inside it, 2+: inside an element
        self._in_string = False
        self._escape = False  # the previous chunk ended in a backslash inside a string
        self._start = -1

    def feed(self, chunk: bytes) -> list[object]:
        buf = self._buf
        scan = len(buf)
        buf += chunk
        if self._escape:
            self._escape = False
            scan += 1
        out: list[object] = []
        skip_to = scan
        for m in _JSON_TOKENS.finditer(buf, scan):
            pos = m.start()
            if pos < skip_to:
                continue
            c = buf[pos]
            if self._in_string:
                if c == 0x5C:  # backslash: the next byte is escaped
                    skip_to = pos + 2
                    if skip_to > len(buf):
                        self._escape = True
                elif c == 0x22:
                    self._in_string = False
                continue
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth == 2:
                    self._start = pos
            else:  # } ]
                self._depth -= 1
                if self._depth == 1 and self._start >= 0:
                    try:
                        out.append(json.loads(buf[self._start : pos + 1]))
                    except (ValueError, RecursionError):
                        pass
                    self._start = -1
                elif self._depth < 0:
                    self._depth = 0
        if self._start >= 0:
            del buf[: self._start]
            self._start = 0
        else:
            buf.clear()
        return out


# ---------------------------------------------------------------------------------------------
# requests


def add_include_usage(body: dict[str, Any]) -> bool:
    """Ask an OpenAI chat / completions stream for its usage chunk.

    Returns True when the gateway, not the client, asked for it: the caller must then run the
    response through `StreamTap(..., strip_usage_chunk=True)`. Mutates `body`.
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if not isinstance(options, dict):
        options = {}
        body["stream_options"] = options
    options["include_usage"] = True
    return True


_GEMINI_MODEL = re.compile(r"/(?:tuned)?[mM]odels/([^/:?]+):")


def request_facts(
    family: Family, kind: EndpointKind, body: Mapping[str, Any] | None, path: str
) -> RequestFacts:
    body = body if isinstance(body, Mapping) else {}
    path = path.split("?", 1)[0]
    if family is Family.GEMINI:
        m = _GEMINI_MODEL.search(path)
        model = m.group(1) if m else _str(body.get("model"))
        stream = path.endswith(":streamGenerateContent")
        max_out = _dict(body.get("generationConfig")).get("maxOutputTokens")
    else:
        model = _str(body.get("model"))
        stream = body.get("stream") is True
        max_out = None
        for key in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
            if key in body and body[key] is not None:
                max_out = body[key]
                break
    limit = max_out if isinstance(max_out, int) and not isinstance(max_out, bool) else None
    return RequestFacts(model=model, stream=stream, max_output_tokens=limit)


def endpoint_kind_for(family: Family, method: str, path: str) -> EndpointKind:
    """What a request is, from its method and path. Only POSTs generate tokens; a GET of
    /v1/responses/{id} or of stored chat completions is OTHER."""
    if method.upper() != "POST":
        return EndpointKind.OTHER
    path = path.split("?", 1)[0].rstrip("/")
    if family is Family.GEMINI:
        if path.endswith((":generateContent", ":streamGenerateContent")):
            return EndpointKind.CHAT
        return EndpointKind.OTHER
    if family is Family.ANTHROPIC:
        return EndpointKind.MESSAGES if path.endswith("/v1/messages") else EndpointKind.OTHER
    if path.endswith("/chat/completions"):
        return EndpointKind.CHAT
    if path.endswith("/responses"):
        return EndpointKind.RESPONSES
    if path.endswith("/completions"):
        return EndpointKind.COMPLETIONS
    if path.endswith("/embeddings"):
        return EndpointKind.EMBEDDINGS
    return EndpointKind.OTHER
