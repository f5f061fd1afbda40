"""The meter stage, called directly on mitmproxy test flows: the stream callback and estimates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy.test import tflow

from spendgate.pricing import Pricer
from spendgate.providers.wire import EndpointKind, UsageSource
from spendgate.stages.call import Call
from spendgate.stages.estimate import Estimator
from spendgate.stages.meter import Meter
from spendgate.testing import tcall, tprovider

# --------------------------------------------------------------------------- the stream callback


def _streamed_flow(provider: str, kind: str, body: dict[str, Any], *, strip: bool = False) -> tuple[Any, Call]:
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    call = tcall(f, provider=tprovider(provider), kind=EndpointKind(kind), body=body)
    call.metering.added_usage = strip  # as if the meter itself had asked the stream for usage
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
    meter = Meter(Pricer({}), Estimator(4096))
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
    meter = Meter(Pricer({}), Estimator(4096))
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
    asyncio.run(meter.finish(f, call))
    assert call.metering.source is UsageSource.ESTIMATED
    usage = call.metering.usage
    assert usage is not None
    assert usage.input_tokens == 17  # what the provider did report is kept
    assert usage.output_tokens > 20, usage  # ~60 tokens of text passed, not the placeholder 1
