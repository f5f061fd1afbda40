"""The upstream fault matrix, for an HTTP/1.1 and an HTTP/2 client: an upstream that refuses the
connection (502), never sends headers (504 after ``upstream_timeout_seconds``), falls silent
mid-stream (cut after ``stream_idle_timeout_seconds``), cuts its stream, or answers 5xx. Each
answer is provider-shaped with ``x-spendgate-request-id`` where the gateway writes it, and the
audit row's outcome says what happened.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.hostile import CALLS, REQUEST_ID, HostileClient, assert_provider_error, audit_row
from tests.rig.leaks import SecretScan
from tests.rig.mock_provider import MockProvider

OPENAI = "https://api.openai.com/v1/chat/completions"
JSON = {"content-type": "application/json"}
STREAM_BODY = json.dumps({**CALLS["openai"].doc, "stream": True}).encode()

clients = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])


def _version(http2: bool) -> str:
    return "HTTP/2" if http2 else "HTTP/1.1"


@clients
def test_upstream_refusing_connections_is_502(gw: GatewayProcess, client: HostileClient, key: str, scan: SecretScan,
                                              mock_provider: MockProvider, http2: bool) -> None:
    """Mistral's configured upstream is a closed local port."""
    with client.httpx(key, http2=http2) as h:
        r = h.post("https://api.mistral.ai/v1/chat/completions", headers=JSON,
                   content=json.dumps({"model": "mistral-small-latest", "messages": CALLS["openai"].doc["messages"]}))
    scan.record_httpx(r)
    assert r.http_version == _version(http2)
    assert_provider_error(r, "openai", 502, "spendgate_upstream_unreachable")
    assert mock_provider.requests == []
    row = audit_row(gw, r.headers[REQUEST_ID])
    assert (row["outcome"], row["status_code"], row["provider"]) == ("upstream_error", 502, "mistral"), row


@clients
def test_upstream_silent_before_headers_is_504(gw_limits: GatewayProcess, client_limits: HostileClient,
                                               limits_key: str, scan: SecretScan, mock_provider: MockProvider,
                                               http2: bool) -> None:
    timeout = gw_limits.config["proxy"]["upstream_timeout_seconds"]
    t0 = time.monotonic()
    with client_limits.httpx(limits_key, http2=http2, timeout=timeout + 6) as h:
        r = h.post(OPENAI, content=CALLS["openai"].body, headers={**JSON, "x-mock-scenario": "hang; hang_s=6"})
    elapsed = time.monotonic() - t0
    scan.record_httpx(r)
    assert_provider_error(r, "openai", 504, "spendgate_upstream_timeout")
    assert timeout - 0.5 <= elapsed <= timeout + 2.5, f"answered after {elapsed:.1f}s"
    assert len(mock_provider.requests) == 1
    row = audit_row(gw_limits, r.headers[REQUEST_ID])
    assert (row["outcome"], row["status_code"]) == ("upstream_error", 504), row


@clients
def test_stream_silent_mid_way_is_cut(gw_limits: GatewayProcess, client_limits: HostileClient, limits_key: str,
                                      scan: SecretScan, mock_provider: MockProvider, http2: bool) -> None:
    idle = gw_limits.config["proxy"]["stream_idle_timeout_seconds"]
    got = b""
    with client_limits.httpx(limits_key, http2=http2, timeout=httpx.Timeout(10, read=idle + 4)) as h, \
            h.stream("POST", OPENAI, content=STREAM_BODY,
                     headers={**JSON, "x-mock-scenario": "slow; delay_ms=8000; chunks=3"}) as r:
        assert r.status_code == 200
        t0 = time.monotonic()
        try:
            for chunk in r.iter_raw():
                got += chunk
        except httpx.ReadTimeout:
            pytest.fail(f"the stream was still open {idle + 4}s after its last event")
        except httpx.TransportError:
            pass  # cut: as it should be
        elapsed = time.monotonic() - t0
        scan.record_httpx(r, got)
        rid = r.headers[REQUEST_ID]
    assert b"[DONE]" not in got
    assert elapsed < idle + 3, f"cut only after {elapsed:.1f}s"
    assert len(mock_provider.requests) == 1
    row = audit_row(gw_limits, rid)
    assert row["outcome"] == "upstream_error", row
    assert "idle" in (row["error"] or "").lower(), f"the row must say the stream went idle: {row['error']!r}"


@clients
def test_stream_cut_by_the_upstream_is_an_upstream_error(gw: GatewayProcess, client: HostileClient, key: str,
                                                         scan: SecretScan, mock_provider: MockProvider,
                                                         http2: bool) -> None:
    got = b""
    truncated = {**JSON, "x-mock-scenario": "truncate; chunks=8"}
    with client.httpx(key, http2=http2) as h, h.stream("POST", OPENAI, content=STREAM_BODY, headers=truncated) as r:
        assert r.http_version == _version(http2)
        with pytest.raises(httpx.TransportError):
            for chunk in r.iter_raw():
                got += chunk
        scan.record_httpx(r, got)
        rid = r.headers[REQUEST_ID]
    assert b"[DONE]" not in got
    assert len(mock_provider.requests) == 1
    assert audit_row(gw, rid)["outcome"] == "upstream_error"


@clients
def test_upstream_5xx_is_passed_through(gw: GatewayProcess, client: HostileClient, key: str, scan: SecretScan,
                                        mock_provider: MockProvider, http2: bool) -> None:
    with client.httpx(key, http2=http2) as h:
        r = h.post(OPENAI, content=CALLS["openai"].body, headers={**JSON, "x-mock-scenario": "error500"})
    scan.record_httpx(r)
    assert r.http_version == _version(http2)
    (rec,) = mock_provider.wait_for(1)
    assert r.status_code == 500 and r.content == rec.response_body  # the provider's own error, unchanged
    assert r.headers[REQUEST_ID].startswith("sgr_")
    row = audit_row(gw, r.headers[REQUEST_ID])
    assert (row["outcome"], row["status_code"]) == ("upstream_error", 500), row
