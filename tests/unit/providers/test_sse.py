"""spendgate.providers.sse: the SSE parser (the WHATWG event-stream rules), under any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.providers.sse import SSEEvent, SSEParser


def parse(*chunks: bytes) -> list[SSEEvent]:
    p = SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out += p.feed(c)
    return out


@pytest.mark.parametrize(
    "stream, expected",
    [
        (b"data: hi\n\n", [SSEEvent(data="hi")]),
        (b"data:hi\n\n", [SSEEvent(data="hi")]),
        (b"data:  two spaces\n\n", [SSEEvent(data=" two spaces")]),
        (b"data: a\ndata: b\n\n", [SSEEvent(data="a\nb")]),
        (b"data: a\r\ndata: b\r\n\r\n", [SSEEvent(data="a\nb")]),
        (b"data: a\rdata: b\r\r", [SSEEvent(data="a\nb")]),
        (b"data: a\r\ndata: b\n\r\n", [SSEEvent(data="a\nb")]),
        (b"event: ping\ndata: {}\n\n", [SSEEvent(event="ping", data="{}")]),
        (b": comment\n\n", []),
        (b": comment\ndata: x\n\n", [SSEEvent(data="x")]),
        (b"event: only\n\n", []),  # no data: nothing is dispatched
        (b"data\n\n", [SSEEvent(data="")]),  # a field with no colon has an empty value
        (b"data\ndata\n\n", [SSEEvent(data="\n")]),
        (b"data: x\n", []),  # no blank line yet
        (b"id: 7\ndata: x\n\ndata: y\n\n", [SSEEvent(data="x", id="7"), SSEEvent(data="y", id="7")]),
        (b"id: a\x00b\ndata: x\n\n", [SSEEvent(data="x")]),
        (b"retry: 1500\ndata: x\n\n", [SSEEvent(data="x", retry=1500)]),
        (b"retry: 15x\ndata: x\n\n", [SSEEvent(data="x")]),
        (b"unknown: z\ndata: x\n\n", [SSEEvent(data="x")]),
        (b"\xef\xbb\xbfdata: bom\n\n", [SSEEvent(data="bom")]),
        (b"data: caf\xc3\xa9\n\n", [SSEEvent(data="café")]),
        (b"data: bad \xff\n\n", [SSEEvent(data="bad \ufffd")]),
        (b"\n\n\ndata: x\n\n", [SSEEvent(data="x")]),
    ],
)
def test_parse(stream: bytes, expected: list[SSEEvent]) -> None:
    assert parse(stream) == expected


def test_crlf_split_between_cr_and_lf() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n\r") == [SSEEvent(data="a")]
    # the LF after that CR completes the blank line's CRLF; it is not another blank line
    assert p.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(data="b")]


def test_long_line_in_tiny_pieces() -> None:
    p = SSEParser()
    body = b"data: " + b"x" * 100_000 + b"\n\n"
    events: list[SSEEvent] = []
    for i in range(0, len(body), 7):
        events += p.feed(body[i : i + 7])
    assert events == [SSEEvent(data="x" * 100_000)]


def test_boundaries_report_offsets() -> None:
    p = SSEParser()
    chunk = b"data: a\n\n: c\n\ndata: b\n"
    assert p.feed_boundaries(chunk) == [(9, SSEEvent(data="a")), (14, None)]
    assert p.pending
    assert p.feed_boundaries(b"\n") == [(1, SSEEvent(data="b"))]
    assert not p.pending


_line = st.one_of(
    st.builds(lambda v: b"data: " + v, st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
    st.sampled_from([b"event: x", b"id: 1", b": hi", b"retry: 10", b"data", b"data:", b""]),
    st.text(max_size=10).map(lambda s: ("data: " + s.replace("\r", "").replace("\n", "")).encode()),
)
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_line, _eol), max_size=30))
    return b"".join(line + eol for line, eol in lines)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


@given(st.data())
def test_any_chunking_gives_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = data.draw(splits(stream))
    assert b"".join(chunks) == stream
    assert parse(*chunks) == parse(stream)


@given(st.data())
def test_boundary_offsets_cover_the_stream(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = data.draw(splits(stream))
    p = SSEParser()
    ends: list[int] = []
    base = 0
    for c in chunks:
        ends += [base + off for off, _ in p.feed_boundaries(c)]
        base += len(c)
    assert ends == sorted(ends)
    assert all(0 < e <= len(stream) for e in ends)
    for e in ends:  # every boundary ends on a line terminator
        assert stream[e - 1 : e] in (b"\n", b"\r")
