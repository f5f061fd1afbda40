"""The meter stage and outcome classification, called directly on mitmproxy test flows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from spendgate.call import META, Call
from spendgate.meter import Meter, body_text, nano_usd
from spendgate.outcome import classify_error, client_gone
from spendgate.pricing import Pricer
from spendgate.providers import BUILTIN_PROVIDERS
from spendgate.settings import ProviderSettings

# --------------------------------------------------------------------------- money


@pytest.mark.parametrize(("usd", "nano"), [
    (None, None),
    (Decimal(0), 0),
    (Decimal("0.0000125"), 12_500),
    (Decimal("0.0057675"), 5_767_500),
    (Decimal("1"), 1_000_000_000),
    (Decimal("123456.789012345"), 123_456_789_012_345),
    (Decimal("0.000000001"), 1),
    # Below a nano-dollar: round half to even, never truncate a whole nano away.
    (Decimal("0.0000000004"), 0),
    (Decimal("0.0000000006"), 1),
    (Decimal("0.0000000015"), 2),
    (Decimal("0.0000000025"), 2),
    (Decimal("2.5E-7"), 250),
])
def test_nano_usd(usd: Decimal | None, nano: int | None) -> None:
    got = nano_usd(usd)
    assert got == nano and (got is None or type(got) is int)


def test_nano_usd_is_exact_for_prices_summed_over_many_requests() -> None:
    # Integer nano-USD sums exactly where floats drift: 10_000 x $0.0000001 is $0.001 on the nose.
    assert sum(nano_usd(Decimal("0.0000001")) or 0 for _ in range(10_000)) == nano_usd(Decimal("0.001"))


def test_body_text() -> None:
    assert body_text(None) is None
    assert body_text(b"") == ""
    assert body_text("héllo".encode()) == "héllo"
    assert body_text(b"\xff ok") == "\ufffd ok"  # never raises on bytes that are not UTF-8


# --------------------------------------------------------------------------- outcome classification


def _flow(*, response: bool, error: str | None, client_closed: bool = False) -> Any:
    f = tflow.tflow(resp=response)
    if error is not None:
        f.error = mflow.Error(error)
    if client_closed:
        f.client_conn.state = ConnectionState.CLOSED
    return f


@pytest.mark.parametrize(("response", "error", "client_closed", "want"), [
    (False, "Client disconnected.", False, ("client_aborted", None)),
    (True, "Client disconnected.", False, ("client_aborted", 200)),
    (True, "HTTP/2 protocol error: stream reset", True, ("client_aborted", 200)),
    (True, "HTTP/1 protocol error: peer closed connection without sending complete message body", False,
     ("upstream_error", 200)),
    (False, "[Errno 111] Connect call failed ('127.0.0.1', 1)", False, ("upstream_error", 502)),
    (False, "Server connection timed out", False, ("upstream_error", 504)),
    (False, "TLS handshake failed", False, ("upstream_error", 502)),
], ids=["client-gone-before-answer", "client-gone-mid-answer", "client-conn-closed", "upstream-cut-answer",
        "connect-refused", "connect-timeout", "tls-failure"])
def test_classify_error(response: bool, error: str, client_closed: bool, want: tuple[str, int | None]) -> None:
    f = _flow(response=response, error=error, client_closed=client_closed)
    assert classify_error(f) == want
    assert client_gone(f) == (want[0] == "client_aborted")


# --------------------------------------------------------------------------- the stream callback


def _provider(name: str) -> ProviderSettings:
    spec = BUILTIN_PROVIDERS[name]
    return ProviderSettings(name=name, spec=spec, hosts=spec.hosts, api_key="k", api_key_source=None,
                            upstream=None, verify_upstream_tls=True)


def _streamed_flow(provider: str, kind: str, body: dict[str, Any], *, strip: bool = False) -> tuple[Any, Call]:
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    call = Call(request_id="sgr_test", provider=_provider(provider), endpoint_kind=kind,
                model_requested=body.get("model"), stream=True, body=body)
    if strip:
        call.extra["strip_usage"] = True
    f.metadata[META] = call
    return f, call


def _pieces(out: bytes | Iterable[bytes]) -> list[bytes]:
    """What mitmproxy does with a stream callback's return value: bytes are one chunk to send."""
    return [out] if isinstance(out, bytes) else list(out)


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()) + b"\n\n"


def test_stream_callback_never_emits_an_empty_chunk_mid_stream() -> None:
    """mitmproxy writes each returned chunk as an HTTP/1 chunk: an empty one is `0\\r\\n\\r\\n`,
    the end of the body. Removing the usage chunk (or holding back half an event) must
    therefore return nothing at all, not b""."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    f, _ = _streamed_flow("openai", "chat", body, strip=True)
    meter = Meter(None, Pricer({}))  # type: ignore[arg-type]  # the stream callback needs no runtime
    meter.responseheaders(f)
    on_chunk = f.response.stream
    assert callable(on_chunk)
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "usage": None}
    events = [
        _sse({**chunk, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
        _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        _sse({**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
        _sse(b"[DONE]"),
    ]
    sent: list[bytes] = []
    for ev in events[:2]:
        sent += _pieces(on_chunk(ev))
    half = len(events[2]) // 2  # the usage chunk arrives in two reads
    for part in (events[2][:half], events[2][half:], events[3]):
        sent += _pieces(on_chunk(part))
    assert b"" not in sent, f"an empty chunk mid-stream ends the client's body early: {sent}"
    assert b"".join(sent).endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in b"".join(sent)


def test_truncated_anthropic_stream_is_estimated() -> None:
    """message_start carries a placeholder output count (1); a stream cut before message_delta
    has no real usage, so the row must be an estimate from the text that did pass."""
    body = {"model": "claude-sonnet-4-20250514", "max_tokens": 200, "stream": True,
            "messages": [{"role": "user", "content": "Tell me about sheep."}]}
    f, call = _streamed_flow("anthropic", "messages", body)
    meter = Meter(None, Pricer({}))  # type: ignore[arg-type]
    meter.responseheaders(f)
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514", "content": [],
        "usage": {"input_tokens": 17, "output_tokens": 1, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0}}}
    text = "Sheep are domesticated ruminant mammals kept as livestock, mostly for wool, meat and milk. " * 3
    f.response.stream(b"event: message_start\n" + _sse(start))
    for word in text.split(" "):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word + " "}}
        f.response.stream(b"event: content_block_delta\n" + _sse(delta))
    f.error = mflow.Error("HTTP/1 protocol error: peer closed connection without sending complete message body")
    asyncio.run(meter.error(f))
    assert call.extra["usage_source"] == "estimated"
    usage = call.extra["usage"]
    assert usage.input_tokens == 17  # what the provider did report is kept
    assert usage.output_tokens > 20, usage  # ~60 tokens of text passed, not the placeholder 1
