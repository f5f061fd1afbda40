"""Reading a streamed response as it passes: framing (SSE, a streamed JSON array) and byte-exact
forwarding. Each decoded event goes to the family's adapter (`spendgate.providers`). Pure: bytes in,
bytes and values out.
"""

from __future__ import annotations

import json
import re
from typing import Any

from spendgate.providers.base import OUTPUT_TEXT_LIMIT, StreamFormat, StreamState, WireAdapter
from spendgate.providers.sse import SSEEvent, SSEParser
from spendgate.providers.wire import EndpointKind, Usage

__all__ = ["StreamTap"]

_JSON_TOKENS = re.compile(rb'["\\{}\[\]]')
_TEXT_EVENTS_LIMIT = 4 * OUTPUT_TEXT_LIMIT  # undecoded events kept for an estimate (JSON framing included)
_TEXT_ONLY: dict[str, Any] = {}  # _observe's "kept undecoded" marker


class StreamTap:
    """Watches one streamed response and reports what the provider said it used.

    `feed` returns the bytes to forward. Observe-only unless `strip_added_usage` (the gateway itself
    asked the stream for its usage, see `WireAdapter.prepare_stream`): then each event goes out as
    the adapter's `unask_usage` says the client would have got it. Each event is forwarded as soon
    as it is complete; only an unfinished event is held back.

    Only events that can carry usage, the model or the end are decoded as they pass; text-only
    events (most of a stream, `WireAdapter.text_only`) are kept undecoded, up to a bound, and
    decoded only if the output has to be estimated (a stream cut short).
    """

    def __init__(self, adapter: WireAdapter, kind: EndpointKind, fmt: StreamFormat,
                 strip_added_usage: bool = False) -> None:
        self.kind = kind
        self.strip = strip_added_usage and fmt is StreamFormat.SSE
        self._adapter = adapter
        self._state = StreamState()
        self._parser = SSEParser()
        self._held = bytearray()
        self._cr_owner: bool | None = None
        self._verbatim = False
        self._mode = fmt
        self._json = _JsonArraySplitter()
        self._seen = False  # an event was decoded (the first always is: it names model and id)
        self._text_events: list[str] = []  # undecoded text-only events, in order, up to _TEXT_EVENTS_LIMIT
        self._text_events_bytes = 0
        self._skipped_bytes = 0

    @property
    def completed(self) -> bool:
        return self._state.completed

    @property
    def output_text_bytes(self) -> int:
        """Generated text seen so far, in bytes; text-only events count whole (an upper bound)."""
        return self._state.output_text_bytes + self._skipped_bytes

    @property
    def usage(self) -> Usage | None:
        state = self._state
        if state.raw_usage is None:
            return None
        return self._adapter.usage(state.raw_usage, state.model, state.response_id)

    @property
    def output_text(self) -> str:
        """Generated text seen so far, at most about OUTPUT_TEXT_LIMIT bytes of it (for estimates)."""
        if not self._text_events:
            return self._state.output_text
        texts = StreamState()
        texts.add_text(self._state.output_text)
        for data in self._text_events:
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                self._adapter.observe(self.kind, obj, texts)
        return texts.output_text

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward for `chunk`. `b""` means end of stream (as mitmproxy's stream
        callback is told) and releases anything held back."""
        if not chunk:
            return self.flush()
        if self._mode is StreamFormat.JSON_ARRAY:
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
            obj = self._observe(event) if event is not None else None
            sent = raw
            if self._verbatim:
                self._verbatim = False
            elif obj is not None:
                sent = self._adapter.unask_usage(obj if obj is not _TEXT_ONLY else None, raw)
            keep = bool(sent)
            if keep:
                out += sent
            # `raw`, not `sent`: a dropped event that ended in a bare CR still owns the LF after it.
            if end == len(forward) and raw.endswith(b"\r"):
                self._cr_owner = keep
        self._held += forward[start:]
        return bytes(out)

    def _observe(self, event: SSEEvent) -> dict[str, Any] | None:
        """The decoded event; `_TEXT_ONLY` for one kept undecoded; None for one that is not JSON."""
        data = event.data
        if data == "[DONE]":
            self._state.completed = True
            return None
        if not data or data[0] != "{":
            return None
        if self._seen and self._adapter.text_only(self.kind, event.event, data):
            self._skipped_bytes += len(data)
            if self._text_events_bytes < _TEXT_EVENTS_LIMIT:
                self._text_events.append(data)
                self._text_events_bytes += len(data)
            return _TEXT_ONLY
        self._seen = True
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        self._observe_json(obj)
        return obj

    def _observe_json(self, obj: object) -> None:
        if isinstance(obj, dict):
            self._adapter.observe(self.kind, obj, self._state)


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
