"""What the gateway's HTTP/2 server refuses, and what it trims instead of resetting."""

from __future__ import annotations

import pytest

from spendgate.edge.http2 import _trimmed, header_problem

BASE = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"api.openai.com"), (b":path", b"/v1/x")]


@pytest.mark.parametrize(
    "extra, problem",
    [
        ([(b"authorization", b"Bearer ")], None),  # the provider docs' curl, key unset: trimmed, not refused
        ([(b"x-a", b" padded\t")], None),
        ([(b"te", b"trailers")], None),
        ([(b"x-a", b"a\r\nx-b: c")], "CR, LF or NUL"),
        ([(b"x-a", b"a\x00")], "CR, LF or NUL"),
        ([(b"connection", b"keep-alive")], "connection-specific header 'connection'"),
        ([(b"transfer-encoding", b"chunked")], "connection-specific header 'transfer-encoding'"),
        ([(b"upgrade", b"websocket")], "connection-specific header 'upgrade'"),
        ([(b"te", b"gzip")], "connection-specific header 'te'"),
        ([(b"X-Upper", b"v")], "upper-case header name"),
        ([(b"", b"v")], "empty header name"),
        ([(b"bad name", b"v")], "invalid header name"),
        ([(b"x-a", b"v"), (b":path", b"/other")], "after regular headers"),
        ([(b":evil", b"v")], "unknown pseudo-header"),
    ],
)
def test_header_problem(extra: list[tuple[bytes, bytes]], problem: str | None) -> None:
    found = header_problem(BASE + extra)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_pseudo_headers_are_not_trailers() -> None:
    assert header_problem([(b":path", b"/x")], trailers=True) is not None
    assert header_problem([(b"x-checksum", b"abc")], trailers=True) is None


def test_values_are_trimmed_of_surrounding_whitespace_only() -> None:
    assert _trimmed([(b"authorization", b"Bearer "), (b"x", b" a b\t")]) == [(b"authorization", b"Bearer"),
                                                                             (b"x", b"a b")]
