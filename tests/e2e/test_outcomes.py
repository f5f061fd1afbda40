"""How requests end, through a real `spendgate serve`: streams the client asked no usage for
(exact counts, unchanged bytes), clients that hang up, upstream errors, refused connections
and streams the upstream cuts short."""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.mock_provider import MockProvider, content_pieces

REQUEST_ID = "x-spendgate-request-id"
OPENAI = "https://api.openai.com/v1"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"
MSGS = [{"role": "user", "content": "Tell me about sheep."}]
TRUNCATED = "stream ended before its final event (usage estimated)"  # the contract's wording


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    # Mistral's upstream is a closed port: the "upstream refuses the connection" case.
    g = GatewayProcess(tmp_path_factory.mktemp("gw-outcomes"), _mock_provider_session.url, name="outcomes",
                       overrides={"providers": {"mistral": {"upstream": "https://127.0.0.1:1",
                                                            "verify_upstream_tls": False}}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    return str(gw.create_key("otto", team="t-outcomes")["key"])


def audit_row(gw: GatewayProcess, request_id: str | None = None, *, provider: str | None = None,
              timeout: float = 10.0) -> dict[str, Any]:
    """The finished audit row with this id (or the newest finished one of `provider`)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = gw.cli_json("audit", "--limit", "1000")
        for r in rows:
            if (request_id is None or r["id"] == request_id) and (provider is None or r["provider"] == provider):
                if r["ended_at"] is not None:
                    return dict(r)
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished audit row for {request_id or provider} after {timeout}s: {rows[:5]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- streams without usage

# The mock gives each answer its own id ("chatcmpl-mock000042", from a per-request counter) and
# stamps `created` with the second the request arrived. Those two fields legitimately differ
# between two requests, so they are blanked in both streams; every other byte must match.
_PER_REQUEST = [(re.compile(rb'"id":"(chatcmpl|cmpl)-mock\d+"'), rb'"id":"\1-ID"'),
                (re.compile(rb'"created":\d+'), rb'"created":0')]


def normalise(stream: bytes) -> bytes:
    for pattern, repl in _PER_REQUEST:
        stream = pattern.sub(repl, stream)
    return stream


def data_events(stream: bytes) -> list[str]:
    return [line[len(b"data: "):].decode() for line in stream.split(b"\n") if line.startswith(b"data: ")]


STREAM_BODIES = {
    "chat": ("/chat/completions", {"model": "gpt-4o", "messages": MSGS, "stream": True}),
    "completions": ("/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Sheep are", "stream": True}),
}


@pytest.mark.parametrize("client_asked_usage", [False, True], ids=["no-usage-asked", "usage-asked"])
@pytest.mark.parametrize("endpoint", sorted(STREAM_BODIES))
def test_stream_usage_exact_and_bytes_unchanged(gw: GatewayProcess, key: str, mock_provider: MockProvider,
                                                endpoint: str, client_asked_usage: bool) -> None:
    path, body = STREAM_BODIES[endpoint]
    body = dict(body)
    if client_asked_usage:
        body["stream_options"] = {"include_usage": True}
    # Spaced events: each reaches the gateway as its own read, as over a real network.
    headers = {"x-mock-scenario": "slow; delay_ms=25; chunks=6"}

    with gw.httpx_client(key) as h, h.stream("POST", OPENAI + path, json=body, headers=headers) as r:
        assert r.status_code == 200
        via_gateway = b"".join(r.iter_raw())
        request_id = r.headers[REQUEST_ID]
    upstream = mock_provider.wait_for(1)[0]
    assert upstream.include_usage, "the gateway must ask the upstream for the usage chunk"

    # The same request straight to the upstream, without the gateway.
    direct_tls = ssl.create_default_context(cafile=str(mock_provider.cert_path))
    with httpx.Client(verify=direct_tls, trust_env=False, timeout=30) as h, \
            h.stream("POST", mock_provider.url + "/v1" + path, json=body, headers=headers) as r:
        direct = b"".join(r.iter_raw())
    assert mock_provider.wait_for(2)[1].include_usage == client_asked_usage

    events = data_events(via_gateway)
    assert events and events[-1] == "[DONE]", f"the client's stream must end with [DONE]: {events[-2:]}"
    assert any('"usage":{' in e for e in events) == client_asked_usage
    assert data_events(normalise(via_gateway)) == data_events(normalise(direct))
    assert normalise(via_gateway) == normalise(direct)

    assert upstream.completed and upstream.usage_sent, "the gateway must read the upstream's stream to its end"
    row = audit_row(gw, request_id)
    assert (row["outcome"], row["status_code"], row["usage_source"]) == ("completed", 200, "provider")
    u = upstream.usage
    assert (row["input_tokens"], row["output_tokens"]) == (u["prompt_tokens"], u["completion_tokens"])


def test_sdk_stream_without_usage_gets_no_usage_chunk(gw: GatewayProcess, key: str,
                                                       mock_provider: MockProvider) -> None:
    mock_provider.set_next("ok", input_tokens=640, output_tokens=9, cache_read_tokens=128, reasoning_tokens=3)
    raw = gw.openai_client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, stream=True)
    chunks = list(raw.parse())
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(content_pieces(5))
    assert mock_provider.last.include_usage
    row = audit_row(gw, raw.headers[REQUEST_ID])
    assert row["usage_source"] == "provider" and row["outcome"] == "completed"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"], row["reasoning_tokens"]) == (
        640, 9, 128, 3)


# --------------------------------------------------------------------------- the client hangs up


def _first_text_then_close_openai(gw: GatewayProcess, key: str, headers: dict[str, str]) -> str:
    raw = gw.openai_client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, stream=True, extra_headers=headers)
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    return raw.headers[REQUEST_ID]


def _first_text_then_close_anthropic(gw: GatewayProcess, key: str, headers: dict[str, str]) -> str:
    raw = gw.anthropic_client(key).messages.with_raw_response.create(
        model="claude-sonnet-4-20250514", max_tokens=500, messages=MSGS, stream=True, extra_headers=headers)
    stream = raw.parse()
    for event in stream:
        if event.type == "content_block_delta":
            break
    stream.close()
    return raw.headers[REQUEST_ID]


def _first_text_then_close_gemini(gw: GatewayProcess, key: str, headers: dict[str, str]) -> str:
    body = {"contents": [{"role": "user", "parts": [{"text": "Tell me about sheep."}]}]}
    with gw.httpx_client() as h, h.stream("POST", f"{GEMINI}/gemini-2.5-flash:streamGenerateContent",
                                          params={"alt": "sse"}, json=body,
                                          headers={**headers, "x-goog-api-key": key}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                break
        return r.headers[REQUEST_ID]


HANG_UP = {"openai": _first_text_then_close_openai, "anthropic": _first_text_then_close_anthropic,
           "gemini": _first_text_then_close_gemini}


@pytest.mark.parametrize("provider", sorted(HANG_UP))
def test_client_hangs_up_mid_stream(gw: GatewayProcess, key: str, mock_provider: MockProvider, provider: str) -> None:
    chunks = 20
    request_id = HANG_UP[provider](gw, key, {"x-mock-scenario": f"slow; delay_ms=200; chunks={chunks}"})
    upstream = mock_provider.wait_for(1, timeout=10)[0]
    assert upstream.client_disconnected and not upstream.completed, "the gateway must hang up upstream too"
    row = audit_row(gw, request_id)
    assert row["outcome"] == "client_aborted", row
    assert row["usage_source"] == "estimated", "the provider never sent its final usage: the count is an estimate"
    assert 0 < row["output_tokens"] < chunks, row
    assert row["input_tokens"] > 0
    assert row["cost_usd"] is not None and float(row["cost_usd"]) > 0  # it still cost money


# --------------------------------------------------------------------------- upstream errors


def test_upstream_500_openai(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    client = gw.openai_client(key)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, extra_headers={"x-mock-scenario": "error500"})
    assert exc.value.status_code == 500
    assert "Sorry about that" in exc.value.message  # the provider's own error reaches the client
    assert mock_provider.wait_for(1)[0].response_status == 500
    row = audit_row(gw, exc.value.response.headers[REQUEST_ID])
    assert (row["outcome"], row["status_code"]) == ("upstream_error", 500)
    assert "500" in row["error"]
    assert (row["input_tokens"], row["output_tokens"], row["cost_usd"]) == (0, 0, None)


def test_upstream_500_anthropic_stream(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    mock_provider.set_next("error500")
    with pytest.raises(anthropic.InternalServerError) as exc:
        gw.anthropic_client(key).messages.create(model="claude-sonnet-4-20250514", max_tokens=50, messages=MSGS,
                                                 stream=True)
    row = audit_row(gw, exc.value.response.headers[REQUEST_ID])
    assert (row["outcome"], row["status_code"], row["stream"]) == ("upstream_error", 500, True)
    assert row["cost_usd"] is None


def test_upstream_refuses_connection(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    with gw.httpx_client(key) as h:
        r = h.post("https://api.mistral.ai/v1/chat/completions",
                   json={"model": "mistral-small-latest", "messages": MSGS})
    assert r.status_code == 502
    assert mock_provider.requests == []
    row = audit_row(gw, r.headers.get(REQUEST_ID), provider="mistral")
    assert (row["outcome"], row["status_code"], row["model_requested"]) == (
        "upstream_error", 502, "mistral-small-latest")
    assert row["error"], "the row must say why"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (0, 0, 0)
    assert (row["cost_usd"], row["usage_source"]) == (None, None)


# --------------------------------------------------------------------------- the upstream cuts a stream


def _truncated_openai(gw: GatewayProcess, key: str) -> str:
    with gw.httpx_client(key) as h, h.stream("POST", OPENAI + "/chat/completions",
                                             json={"model": "gpt-4o", "messages": MSGS, "stream": True},
                                             headers={"x-mock-scenario": "truncate; chunks=8"}) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()
        return r.headers[REQUEST_ID]


def _truncated_anthropic(gw: GatewayProcess, key: str) -> str:
    with gw.httpx_client(key) as h, h.stream(
            "POST", "https://api.anthropic.com/v1/messages", headers={
                "x-mock-scenario": "truncate; chunks=8", "anthropic-version": "2023-06-01"},
            json={"model": "claude-sonnet-4-20250514", "max_tokens": 100, "messages": MSGS, "stream": True}) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()
        return r.headers[REQUEST_ID]


def _truncated_gemini(gw: GatewayProcess, key: str) -> str:
    body = {"contents": [{"role": "user", "parts": [{"text": "Tell me about sheep."}]}]}
    with gw.httpx_client(key) as h, h.stream("POST", f"{GEMINI}/gemini-2.5-flash:streamGenerateContent",
                                             params={"alt": "sse"}, json=body,
                                             headers={"x-mock-scenario": "truncate; chunks=8"}) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()
        return r.headers[REQUEST_ID]


TRUNCATE = {"openai": _truncated_openai, "anthropic": _truncated_anthropic, "gemini": _truncated_gemini}


@pytest.mark.parametrize("provider", sorted(TRUNCATE))
def test_stream_truncated_by_upstream(gw: GatewayProcess, key: str, mock_provider: MockProvider,
                                      provider: str) -> None:
    request_id = TRUNCATE[provider](gw, key)
    upstream = mock_provider.wait_for(1)[0]
    assert not upstream.completed and not upstream.usage_sent  # the final usage never left the mock
    row = audit_row(gw, request_id)
    assert row["outcome"] == "upstream_error", row
    assert row["usage_source"] == "estimated", f"no final usage arrived, the count is an estimate: {row}"
    assert row["output_tokens"] > 0 and row["input_tokens"] > 0
    assert TRUNCATED in (row["error"] or ""), f"the row must say the stream ended early: {row['error']!r}"

