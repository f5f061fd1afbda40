"""The interface every wire family's adapter implements, and what adapters share.

An adapter knows one family's JSON: what a request is and asks for, which parts of it are the
prompt, how its streams are framed, and what a response says it used. Framing and byte-exact
forwarding stay in `spendgate.providers.stream.StreamTap`, which hands each decoded event to
the adapter. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Upload, Usage

__all__ = [
    "OUTPUT_TEXT_LIMIT",
    "Prompt",
    "StreamFormat",
    "StreamState",
    "WireAdapter",
    "as_count",
    "as_limit",
    "as_mapping",
    "as_text",
    "bare_path",
    "lowered",
    "output_limit",
]

OUTPUT_TEXT_LIMIT = 64 * 1024
MESSAGE_OVERHEAD = 3  # tokens per message, as in OpenAI's cookbook; +3 priming the reply
REPLY_PRIMING = 3


class StreamFormat(StrEnum):
    SSE = "sse"
    JSON_ARRAY = "json-array"  # one JSON array sent piece by piece (Gemini without ?alt=sse)


@runtime_checkable
class WireAdapter(Protocol):
    @property
    def family(self) -> Family: ...

    def endpoint_kind(self, method: str, path: str) -> EndpointKind: ...

    def unmetered(self, method: str, path: str) -> str | None:
        """A name for a request the provider bills but the gateway cannot price before sending it
        (batches, fine-tuning, …), as `[budgets] allow_unmetered` lists it; None: priced or free."""
        ...

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts: ...

    def set_output_limit(self, kind: EndpointKind, body: dict[str, Any], limit: int, field: str) -> None:
        """Lower the request's output limit to `limit` in the provider's own field, inserting it if
        the request had none (`field`: the provider's chat completions field). Mutates `body`."""
        ...

    def response_text(self, kind: EndpointKind, body: Mapping[str, Any]) -> str:
        """The generated text of a JSON answer (to count when the answer reports no usage)."""
        ...

    def media_usage(self, kind: EndpointKind, body: Mapping[str, Any], uploads: Sequence[Upload],
                    facts: RequestFacts, prompt_tokens: int) -> Usage | None:
        """What an image or audio request will bill, before it is sent; None for text endpoints."""
        ...

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        """The parts of the request the provider bills as input; None for endpoints without a prompt."""
        ...

    def prepare_stream(self, kind: EndpointKind, body: dict[str, Any]) -> bool:
        """Ask a stream to report its usage if it would not; True if the body was changed, and
        the stream's usage-only event must then be removed before the client sees it."""
        ...

    def stream_format(self, content_type: str, stream: bool) -> StreamFormat | None:
        """How a response with this content type is framed when streamed; None: not a stream."""
        ...

    def unask_usage(self, event: Mapping[str, Any] | None, raw: bytes) -> bytes:
        """A streamed event as the client would have got it had `prepare_stream` not changed the
        request (`raw` are its bytes; `event` None: not decoded, see `text_only`); b"" drops it."""
        ...

    def text_only(self, kind: EndpointKind, name: str, data: str) -> bool:
        """True if this streamed event (SSE `event:` name and `data`) can only carry generated
        text: no usage, model, id or end. Such events are not decoded as they pass (most of a
        stream), only if the stream is cut short and its output must be estimated."""
        ...

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None: ...

    def usage(self, raw: Mapping[str, Any], model: str | None, response_id: str | None) -> Usage:
        """A `Usage` from the usage block a stream left in `StreamState.raw_usage`."""
        ...

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        """Take what one streamed event says (usage, model, id, end, text) into `state`."""
        ...


def sse_only(content_type: str, stream: bool) -> StreamFormat | None:
    return StreamFormat.SSE if content_type.startswith("text/event-stream") else None


class StreamState:
    """What a stream has said so far. `raw_usage` stays in the provider's shape until the end,
    as some providers send it in parts (Anthropic)."""

    __slots__ = ("_text", "_text_len", "completed", "model", "output_text_bytes", "raw_usage", "response_id")

    def __init__(self) -> None:
        self.model: str | None = None
        self.response_id: str | None = None
        self.raw_usage: dict[str, Any] | None = None
        self.completed = False
        self.output_text_bytes = 0
        self._text: list[str] = []
        self._text_len = 0

    @property
    def output_text(self) -> str:
        """Generated text seen so far, at most OUTPUT_TEXT_LIMIT bytes of it (for estimates)."""
        return "".join(self._text)

    def add_text(self, text: object) -> None:
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


# -- prompts ------------------------------------------------------------------------------------

_MEDIA_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file",
                          "document"})
_MEDIA_KEYS = frozenset({"inline_data", "inlineData", "file_data", "fileData", "image_url", "input_audio"})
# Never prompt text: identifiers, enums, binary payloads, signatures.
_SKIP_KEYS = frozenset({
    "type", "role", "id", "call_id", "tool_call_id", "tool_use_id", "cache_control", "signature", "data", "url",
    "source", "mime_type", "mimeType", "media_type", "detail", "index", "status", "encrypted_content", "file_id",
    "thoughtSignature",
})
_MAX_DEPTH = 64


class Prompt:
    """What a request's prompt is made of, collected by an adapter for counting: text parts, media
    parts (priced flat, never decoded) and per-message framing tokens."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.media = 0
        self.overhead = 0

    @property
    def text(self) -> str:
        return "\n".join(self.parts)

    def walk(self, node: object, depth: int = 0) -> None:
        if isinstance(node, str):
            self.parts.append(node)
        elif depth > _MAX_DEPTH:
            return  # no real prompt nests this deep; don't let a crafted body blow the stack
        elif isinstance(node, list):
            for item in node:
                self.walk(item, depth + 1)
        elif isinstance(node, dict):
            if node.get("type") in _MEDIA_TYPES or any(k in node for k in _MEDIA_KEYS):
                self.media += 1
                return
            for key, value in node.items():
                if key in _SKIP_KEYS:
                    continue
                if key in ("arguments", "args", "input", "response") and not isinstance(value, str):
                    # Structured tool arguments / results: the model reads them as JSON.
                    self.json(value)
                else:
                    self.walk(value, depth + 1)

    def json(self, value: object) -> None:
        if value is not None:
            try:
                self.parts.append(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
            except (ValueError, TypeError, RecursionError):
                pass

    def messages(self, messages: object) -> None:
        if isinstance(messages, list):
            for message in messages:
                self.overhead += MESSAGE_OVERHEAD
                self.walk(message)
            self.overhead += REPLY_PRIMING
        else:
            self.walk(messages)

    def turns(self, turns: object) -> None:
        """Gemini `contents`: framing per turn, no reply priming."""
        if isinstance(turns, list):
            for turn in turns:
                self.overhead += MESSAGE_OVERHEAD
                self.walk(turn)

    def token_lists(self, value: object) -> bool:
        """Prompts may already be token ids (completions / embeddings): count, don't encode."""
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            self.overhead += len(value)
            return True
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            if all(isinstance(t, int) for v in value for t in v):
                self.overhead += sum(len(v) for v in value)
                return True
        return False


# -- lenient readers: a provider's JSON is not trusted to have the documented types -------------


def as_count(value: object) -> int:
    # bool is an int subclass; a provider never means True as a token count.
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value >= 0 and value == value and value != float("inf"):
        return int(value)
    return 0


def as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def as_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def as_limit(value: object) -> int | None:
    """A count a request asks for (an output limit, answers) as a provider may read it: an int, a
    float (`64000.0`, rounded up) or a decimal string (proto3 JSON and lax validators take
    `"64000"`); None for anything else. Reading less than the provider would is a way past a cap."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return math.ceil(value) if math.isfinite(value) else None
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    return None


def lowered(value: object, limit: int) -> int:
    """An output limit lowered to `limit`: a smaller positive one the request set stays."""
    asked = as_limit(value)
    return asked if asked is not None and 0 < asked < limit else limit


OUTPUT_LIMIT_KEYS = ("max_completion_tokens", "max_output_tokens", "max_tokens")


def output_limit(body: Mapping[str, Any]) -> int | None:
    """The largest output limit a body sets under any of the OpenAI / Anthropic names: a provider
    may honour any one of them."""
    limits = [n for key in OUTPUT_LIMIT_KEYS if (n := as_limit(body.get(key))) is not None]
    return max(limits) if limits else None


def bare_path(path: str) -> str:
    return path.split("?", 1)[0]
