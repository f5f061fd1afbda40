"""Incremental Server-Sent-Events parsing (WHATWG HTML, "Parsing an event stream").

The parser only observes: the proxy forwards the stream itself, so this must stay cheap and
never raise on malformed input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser"]

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str = "message"
    data: str = ""
    # The spec's "last event ID": it persists across events until an `id:` field changes it.
    id: str | None = None
    retry: int | None = None


class SSEParser:
    def __init__(self) -> None:
        self._partial = bytearray()  # bytes of a line whose terminator has not arrived yet
        self._skip_lf = False  # the last chunk ended in CR: a leading LF completes that CRLF
        self._first_line = True
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return [event for _, event in self.feed_boundaries(chunk) if event is not None]

    def feed_boundaries(self, chunk: bytes) -> list[tuple[int, SSEEvent | None]]:
        """Like `feed`, but reports every blank line (event boundary).

        Each entry is (offset in `chunk` just past the blank line's terminator, the event it
        dispatched or None). Lets a caller cut the raw bytes of each event out of the stream.
        """
        if not chunk:
            return []
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                start = 1
        if b"\n" not in chunk and b"\r" not in chunk:
            # Cheap path for a long line arriving in many pieces: no quadratic re-joining.
            self._partial += chunk[start:]
            return []
        out: list[tuple[int, SSEEvent | None]] = []
        pos = start
        for m in _LINE_END.finditer(chunk, start):
            if self._partial:
                self._partial += chunk[pos : m.start()]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[pos : m.start()]
            pos = m.end()
            if self._first_line:
                self._first_line = False
                if line.startswith(_BOM):
                    line = line[3:]
            if not line:
                out.append((pos, self._dispatch()))
            else:
                self._line(line)
        if pos < len(chunk):
            self._partial += chunk[pos:]
        elif chunk[-1] == 0x0D:
            self._skip_lf = True
        return out

    @property
    def pending(self) -> bool:
        """True if an event has started but not ended (what EOF would discard, per the spec)."""
        return bool(self._partial or self._data or self._event)

    def _line(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" comment
            return
        colon = line.find(b":")
        if colon == -1:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value and value.isdigit():
                self._retry = int(value)

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data = []
        self._event = ""
        if not data:
            return None
        return SSEEvent(
            event=event or "message",
            data="\n".join(data),
            id=self._last_id or None,
            retry=self._retry,
        )
