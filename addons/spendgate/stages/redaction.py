"""Keeps the team's upstream keys out of what clients see, should an upstream echo them.

Pure: bytes in, bytes out. A key split across two stream chunks is still caught: the end of a
chunk that could be the start of a key is held back until the next chunk decides (SSE events
end in blank lines, so in practice nothing is held).
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

MASK = b"[redacted]"
MIN_SECRET_LEN = 8  # shorter "keys" would redact ordinary words


class Redactor:
    def __init__(self, secrets: Iterable[str | None]) -> None:
        found = {s.encode() for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self._secrets = tuple(sorted(found, key=len, reverse=True))
        self._alphabet = frozenset(b for s in self._secrets for b in s)

    @property
    def active(self) -> bool:
        return bool(self._secrets)

    def whole(self, data: bytes) -> bytes:
        """`data` with every secret masked; the same object when there was none."""
        for s in self._secrets:
            if s in data:
                data = data.replace(s, MASK)
        return data

    def headers(self, headers: http.Headers) -> None:
        # One search per secret over all the values (a NUL, which no header value holds, between
        # them) instead of one per value: nearly every response has none.
        blob = b"\0".join(value for _, value in headers.fields)
        if not any(s in blob for s in self._secrets):
            return
        for i, (name, value) in enumerate(headers.fields):
            clean = self.whole(value)
            if clean is not value:
                fields = list(headers.fields)
                fields[i] = (name, clean)
                headers.fields = tuple(fields)

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


class StreamRedactor:
    def __init__(self, redactor: Redactor) -> None:
        self._r = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        data = self._r.whole(data)
        keep = self._partial_tail(data)
        self._held = data[len(data) - keep:] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _partial_tail(self, data: bytes) -> int:
        """Length of the longest end of `data` that is the start of a secret."""
        n = len(data)
        if not n or data[-1] not in self._r._alphabet:
            return 0  # e.g. an SSE event's closing newline: no secret holds it
        best = 0
        for s in self._r._secrets:
            lo = max(0, n - len(s) + 1)
            i = data.rfind(s[:1], lo)
            while i != -1:
                if n - i > best and s.startswith(data[i:]):
                    best = n - i
                i = data.rfind(s[:1], lo, i)
        return best
