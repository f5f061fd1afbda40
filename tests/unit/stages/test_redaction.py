"""The team's upstream keys never reach a client (`spendgate.stages.redaction`), also split across chunks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from spendgate.stages.redaction import MASK, Redactor

KEY = "upstream-openai-test-key-1"
OTHER = "sk-ant-" + "b" * 40
R = Redactor([KEY, OTHER, None, "short"])


def test_whole_bodies_and_headers() -> None:
    body = f'{{"error": "bad key Bearer {KEY}", "x": "{OTHER}"}}'.encode()
    assert R.whole(body) == b'{"error": "bad key Bearer ' + MASK + b'", "x": "' + MASK + b'"}'
    plain = b"nothing to see"
    assert R.whole(plain) is plain
    h = http.Headers(x_echo=f"Bearer {KEY}", other="fine")
    R.headers(h)
    assert h["x-echo"] == "Bearer [redacted]" and h["other"] == "fine"


def test_short_values_are_never_treated_as_secrets() -> None:
    assert R.whole(b"a short story") == b"a short story"
    assert not Redactor([None, "", "abc"]).active


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12), st.sampled_from(["sse", "json"]))
def test_streams_are_redacted_however_they_are_cut(cuts: list[int], shape: str) -> None:
    if shape == "sse":
        data = (f'data: {{"delta": "u"}}\n\ndata: {{"echo": "{KEY}"}}\n\ndata: {{"also": "{OTHER[:30]}'
                f'{OTHER[30:]}", "up": "upstream-"}}\n\n').encode()
    else:
        data = f'[{{"a": "{KEY}{KEY}"}}, {{"b": "upstream-openai-test-key-"}}]'.encode()
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    s = R.stream()
    out = b"".join(s.feed(p) for p in pieces) + s.flush()
    assert out == R.whole(data)
    assert KEY.encode() not in out and OTHER.encode() not in out


def test_an_event_ending_in_a_newline_is_never_held_back() -> None:
    s = R.stream()
    chunk = b'data: {"content": "up"}\n\n'
    assert s.feed(chunk) == chunk
