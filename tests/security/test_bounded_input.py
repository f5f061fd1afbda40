"""Input is bounded as it arrives: answered at the headers when the answer is already known
(no identity, a declared length over ``max_request_bytes``), never a ``100 Continue`` for a
refused request, compressed bodies counted by their inflated size without inflating them into
memory, bounded and timely headers, strict JSON, and only the HTTP methods providers use.
"""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.hostile import (
    CALLS,
    HostileClient,
    RssWatch,
    assert_nothing_reached,
    assert_provider_error,
    audit_row,
    request_id,
)
from tests.rig.mock_provider import MockProvider
from tests.rig.rawclient import HTTP1, basic, chunked, http1_request

BIG = 40 * 1024 * 1024  # over the default max_request_bytes (32 MiB)
MEMORY_SLACK_MIB = 30


def _head(call_name: str, length: int, extra: list[tuple[str, str]] | None = None) -> bytes:
    """Request headers announcing a body of ``length`` bytes, without the body."""
    call = CALLS[call_name]
    return call.raw(headers=[("Content-Length", str(length)), *(extra or [])], body=b"")


def _assert_alive(client: HostileClient, key: str, mock: MockProvider) -> None:
    """A normal request still works end to end; the mock forgets it, so later checks see only the test's own."""
    mock.clear()
    with client.httpx(key) as h:
        r = h.post("https://api.openai.com/v1/chat/completions", content=CALLS["openai"].body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    mock.clear()


# --------------------------------------------------------------------------- answered at the headers


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_no_identity_is_answered_at_the_headers_and_closed(client: HostileClient, mock_provider: MockProvider,
                                                           provider: str) -> None:
    """40 MB announced, not one byte of it sent: the 401 must come anyway, then the close."""
    with client.tunnel(CALLS[provider].host + ":443") as conn:
        conn.send(_head(provider, BIG))
        try:
            r = conn.read_response(timeout=5)
        except TimeoutError:
            pytest.fail("no answer before the body: the gateway waits to read 40 MB it will refuse")
        assert_provider_error(r, CALLS[provider].family, 401)
        assert conn.closed_by_peer(3), "HTTP/1: the connection must be closed after the 401"
    assert_nothing_reached(mock_provider)


def _upload(client: HostileClient, body_chunk: bytes) -> None:
    try:
        with client.tunnel() as conn:
            conn.send(_head("openai", BIG))
            for _ in range(BIG // len(body_chunk)):
                conn.send(body_chunk)
            conn.read_response(timeout=5)
    except OSError:  # the gateway hung up mid-upload, as it should
        pass


def test_parallel_uploads_without_identity_keep_memory_flat(gw: GatewayProcess, client: HostileClient, key: str,
                                                            mock_provider: MockProvider) -> None:
    assert gw.proc is not None
    _assert_alive(client, key, mock_provider)  # warm: the baseline is a serving gateway
    chunk = b"x" * (256 * 1024)
    with RssWatch(gw.proc.pid) as rss:
        threads = [threading.Thread(target=_upload, args=(client, chunk)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert rss.growth_mib < MEMORY_SLACK_MIB, f"RSS grew {rss.growth_mib:.0f} MiB for three refused uploads"
    assert_nothing_reached(mock_provider)
    _assert_alive(client, key, mock_provider)


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
def test_declared_length_over_the_limit_is_413_at_the_headers(client: HostileClient, auth: str,
                                                              mock_provider: MockProvider, expect: bool) -> None:
    extra = [("Expect", "100-continue")] if expect else []
    with client.tunnel(auth=auth) as conn:
        conn.send(_head("openai", BIG, extra))
        try:
            r = conn.read_response(timeout=5)
        except TimeoutError:
            pytest.fail("no answer before the body")
    assert r.status != 100, "100 Continue invites the upload of a body the gateway will refuse"
    assert_provider_error(r, "openai", 413, "spendgate_request_too_large")
    assert_nothing_reached(mock_provider)


def test_expect_100_continue_still_works_for_a_good_request(gw: GatewayProcess, client: HostileClient, auth: str,
                                                            mock_provider: MockProvider) -> None:
    call = CALLS["openai"]
    with client.tunnel(auth=auth) as conn:
        conn.send(_head("openai", len(call.body), [("Expect", "100-continue")]))
        interim = conn.read_response(timeout=5)
        assert interim.status == 100, (interim.status, interim.body[:200])
        conn.send(call.body)
        r = conn.read_response(timeout=10)
    assert r.status == 200, r.body[:300]
    (rec,) = mock_provider.wait_for(1)
    assert rec.json == call.doc
    assert audit_row(gw, request_id(r))["outcome"] == "completed"


def test_chunked_upload_over_the_limit_is_413(client_limits: HostileClient, limits_key: str,
                                              mock_provider: MockProvider) -> None:
    limit = client_limits.gw.config["proxy"]["max_request_bytes"]
    doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "y" * (limit * 3)}]}
    call = CALLS["openai"]
    with client_limits.tunnel(auth=basic("mallory", limits_key)) as conn:
        conn.send(call.raw(headers=[("Transfer-Encoding", "chunked")], body=b""))
        try:
            conn.send(chunked(json.dumps(doc).encode(), 8192))
        except OSError:
            pass  # refused mid-upload
        r = conn.read_response(timeout=5)
    assert_provider_error(r, "openai", 413, "spendgate_request_too_large")
    assert_nothing_reached(mock_provider)


# --------------------------------------------------------------------------- compressed bodies


def test_gzip_bomb_is_413_without_inflating_it(gw: GatewayProcess, client: HostileClient, key: str, auth: str,
                                               mock_provider: MockProvider) -> None:
    assert gw.proc is not None
    bomb = gzip.compress(json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "A" * BIG}]}).encode(), 9)
    assert len(bomb) < 64 * 1024
    _assert_alive(client, key, mock_provider)
    with RssWatch(gw.proc.pid) as rss, client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(headers=[("Content-Encoding", "gzip")], body=bomb))
    assert_provider_error(r, "openai", 413, "spendgate_request_too_large")
    assert rss.growth_mib < MEMORY_SLACK_MIB, f"RSS grew {rss.growth_mib:.0f} MiB for a {len(bomb)} byte body"
    assert_nothing_reached(mock_provider)
    _assert_alive(client, key, mock_provider)


def test_small_gzip_body_is_accepted(gw: GatewayProcess, client: HostileClient, auth: str,
                                     mock_provider: MockProvider) -> None:
    call = CALLS["openai"]
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(call.raw(headers=[("Content-Encoding", "gzip")], body=gzip.compress(call.body)))
    assert r.status == 200, r.body[:300]
    (rec,) = mock_provider.wait_for(1)
    # Forwarded compressed or not, the provider must get a body it can read.
    body = gzip.decompress(rec.body) if (rec.header("content-encoding") or "").lower() == "gzip" else rec.body
    assert json.loads(body) == call.doc
    assert audit_row(gw, request_id(r))["outcome"] == "completed"


@pytest.mark.parametrize("body", [b"\x1f\x8b\x08\x00" + b"\x00\xff" * 50,
                                  gzip.compress(CALLS["openai"].body, mtime=0)[:-12]],
                         ids=["garbage", "truncated"])
def test_corrupt_gzip_is_400(client: HostileClient, auth: str, mock_provider: MockProvider, body: bytes) -> None:
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(headers=[("Content-Encoding", "gzip")], body=body))
    assert_provider_error(r, "openai", 400)
    assert_nothing_reached(mock_provider)


@pytest.mark.parametrize("encoding", ["xyz", "compress"])
def test_unsupported_content_encoding_is_415(client: HostileClient, auth: str, mock_provider: MockProvider,
                                             encoding: str) -> None:
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(headers=[("Content-Encoding", encoding)]))
    assert_provider_error(r, "openai", 415, "spendgate_unsupported_encoding")
    assert_nothing_reached(mock_provider)


# --------------------------------------------------------------------------- headers: size and time


@pytest.mark.parametrize("where", ["in-tunnel", "connect"])
def test_oversized_headers_are_431_and_closed(client: HostileClient, auth: str, mock_provider: MockProvider,
                                              where: str) -> None:
    pad = ("x-pad", "a" * 100_000)
    if where == "connect":
        conn = client.direct()
        request = http1_request("CONNECT", "api.openai.com:443",
                                [("Host", "api.openai.com:443"), ("Proxy-Authorization", auth), pad])
    else:
        conn = client.tunnel(auth=auth)
        request = CALLS["openai"].raw(headers=[pad])
    with conn:
        r = conn.exchange(request)
        assert r.status == 431, (r.status, r.body[:200])
        assert conn.closed_by_peer(3)
    assert_nothing_reached(mock_provider)


def _slow_head(conn: HTTP1, head: bytes, give_up_s: float) -> tuple[float, int | None]:
    """Send ``head`` a byte a second until the gateway answers or closes.

    Returns (seconds, the status answered, None for a bare close, -1 if still open at ``give_up_s``).
    """
    t0 = time.monotonic()
    for byte in head:
        try:
            conn.send(bytes([byte]))
        except OSError:
            return time.monotonic() - t0, None
        if conn.wait_readable(1.0):
            try:
                return time.monotonic() - t0, conn.read_response(timeout=1.0).status
            except TimeoutError:
                pass  # a TLS session ticket, or an answer still arriving
            except OSError:
                return time.monotonic() - t0, None
        if time.monotonic() - t0 > give_up_s:
            break
    return time.monotonic() - t0, -1


@pytest.mark.parametrize("where", ["proxy-port", "in-tunnel"])
def test_slowloris_is_cut_after_the_header_timeout(client_limits: HostileClient, limits_key: str,
                                                   mock_provider: MockProvider, where: str) -> None:
    auth = basic("mallory", limits_key)
    header_timeout = client_limits.gw.config["proxy"]["header_timeout_seconds"]
    if where == "proxy-port":
        conn = client_limits.direct()
        head = http1_request("CONNECT", "api.openai.com:443", [("Host", "api.openai.com:443"),
                                                               ("Proxy-Authorization", auth), ("x-slow", "s" * 40)])
    else:
        conn = client_limits.tunnel(auth=auth)
        head = CALLS["openai"].raw(headers=[("x-slow", "s" * 40)])
    others: list[int] = []

    def meanwhile() -> None:
        time.sleep(0.5)
        with client_limits.httpx(limits_key) as h:
            others.append(h.post("https://api.openai.com/v1/chat/completions", content=CALLS["openai"].body,
                                 headers={"content-type": "application/json"}).status_code)

    other = threading.Thread(target=meanwhile)
    other.start()
    with conn:
        elapsed, status = _slow_head(conn, head, give_up_s=header_timeout + 6)
    other.join(30)
    assert status != -1, f"a client sending a byte a second was still connected after {elapsed:.1f}s"
    assert status in (None, 408), f"answered {status}"
    assert elapsed < header_timeout + 3, f"closed only after {elapsed:.1f}s"
    assert others == [200], "the gateway must keep serving others meanwhile"
    assert len(mock_provider.requests) == 1


# --------------------------------------------------------------------------- JSON and methods

_MSGS = b'"messages":[{"role":"user","content":"hi"}]'
BAD_JSON = {
    "truncated": b'{"model":"gpt-4o-mini",' + _MSGS[:-3],
    "array": b"[1, 2, 3]",
    "string": b'"gpt-4o-mini"',
    "deep-arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep-objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep-inside-messages": b'{"model":"gpt-4o-mini","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "duplicate-model": b'{"model":"gpt-4o","model":"gpt-4o-mini",' + _MSGS + b"}",
    "duplicate-nested-key": b'{"model":"gpt-4o-mini","messages":[{"role":"user","role":"system","content":"hi"}]}',
    "invalid-utf8-in-model": b'{"model":"gpt-4o-mini\xff",' + _MSGS + b"}",
    "invalid-utf8-in-content": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xc3\x28"}]}',
    "overlong-utf8": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xc0\xaf"}]}',
    "nan": b'{"model":"gpt-4o-mini",' + _MSGS + b',"temperature":NaN}',
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_malformed_json_is_400(client: HostileClient, auth: str, mock_provider: MockProvider, case: str) -> None:
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(body=BAD_JSON[case]))
    assert r.status != 500, r.body[:300]
    assert_provider_error(r, "openai", 400, "spendgate_invalid_json")
    assert_nothing_reached(mock_provider)


def test_deep_json_to_anthropic_is_400_in_its_shape(client: HostileClient, auth: str,
                                                    mock_provider: MockProvider) -> None:
    with client.tunnel("api.anthropic.com:443", auth=auth) as conn:
        r = conn.exchange(CALLS["anthropic"].raw(body=BAD_JSON["deep-inside-messages"]))
    assert_provider_error(r, "anthropic", 400)
    assert_nothing_reached(mock_provider)


@pytest.mark.parametrize("method", ["TRACE", "TRACK", "PROPFIND", "FOO"])
def test_method_outside_the_providers_set_is_405(client: HostileClient, auth: str, mock_provider: MockProvider,
                                                 method: str) -> None:
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(method=method))
    assert_provider_error(r, "openai", 405, "spendgate_method_not_allowed")
    assert_nothing_reached(mock_provider)
