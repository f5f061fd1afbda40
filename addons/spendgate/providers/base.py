"""The interface every wire family's adapter implements, and the stream state they update.

An adapter knows one family's JSON; framing (SSE, a streamed JSON array) and the byte-exact
forwarding stay in `spendgate.usage.StreamTap`, which hands each decoded event to the adapter.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from spendgate.wire import EndpointKind, Family, RequestFacts, Usage

__all__ = [
    "OUTPUT_TEXT_LIMIT",
    "StreamState",
    "WireAdapter",
    "as_count",
    "as_limit",
    "output_limit",
    "as_mapping",
    "as_text",
    "bare_path",
]

OUTPUT_TEXT_LIMIT = 64 * 1024


@runtime_checkable
class WireAdapter(Protocol):
    @property
    def family(self) -> Family: ...

    @property
    def streams_json_array(self) -> bool:
        """True if a stream may be one JSON array sent piecemeal rather than SSE."""
        ...

    def endpoint_kind(self, method: str, path: str) -> EndpointKind: ...

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts: ...

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None: ...

    def usage(self, raw: Mapping[str, Any], model: str | None, response_id: str | None) -> Usage:
        """A `Usage` from the usage block a stream left in `StreamState.raw_usage`."""
        ...

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        """Take what one streamed event says (usage, model, id, end, text) into `state`."""
        ...


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


# Lenient readers: a provider's JSON is not trusted to have the documented types.


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


def as_limit(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


OUTPUT_LIMIT_KEYS = ("max_completion_tokens", "max_output_tokens", "max_tokens")


def output_limit(body: Mapping[str, Any]) -> int | None:
    """The first output limit a body sets, under any of the OpenAI / Anthropic names."""
    for key in OUTPUT_LIMIT_KEYS:
        if body.get(key) is not None:
            return as_limit(body[key])
    return None


def bare_path(path: str) -> str:
    return path.split("?", 1)[0]
