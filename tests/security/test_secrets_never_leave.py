"""Secrets never leave: a gateway key is removed from the query whatever the spelling of its
name or value, and from any header it hides in; an upstream that echoes the team's key (in an
error body, a header, or the middle of a stream) has it redacted before the client sees it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.rig.echo_upstream import MODE_HEADER, EchoUpstream
from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.hostile import CALLS, HostileClient, audit_row, request_id
from tests.rig.leaks import SecretScan, decodings, key_secret_part
from tests.rig.mock_provider import MockProvider, RecordedRequest


def _everything_sent(rec: RecordedRequest) -> str:
    return "\n".join([rec.path, rec.query, repr(rec.header_list), rec.body.decode("latin-1")])


def assert_key_not_forwarded(mock: MockProvider, key: str) -> None:
    secret = key_secret_part(key)
    assert secret
    for rec in mock.requests:
        leaked = any(secret in text for text in decodings(_everything_sent(rec)))
        assert not leaked, f"the gateway key reached the upstream: {rec.method} {rec.path}?{rec.query}"
        assert "sg_" not in "\n".join(decodings(rec.path + "?" + rec.query)), rec.query


def _pct(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


QUERIES: dict[str, Callable[[str], str]] = {
    "encoded-name-k%65y": lambda k: f"k%65y={k}",
    "upper-case-name": lambda k: f"KEY={k}",
    "mixed-case-name": lambda k: f"Key={k}",
    "all-encoded-name": lambda k: f"%6B%65%79={k}",
    "encoded-underscores": lambda k: "key=" + k.replace("_", "%5F"),
    "lower-hex-underscores": lambda k: "key=" + k.replace("_", "%5f"),
    "all-encoded-value": lambda k: "key=" + _pct(k),
    "repeated": lambda k: f"key={k}&key={k}",
    "after-another-param": lambda k: f"foo=bar&k%65y={k}",
}


@pytest.mark.parametrize("case", sorted(QUERIES))
@pytest.mark.parametrize("provider", ["gemini", "openai"])
def test_gateway_key_in_the_query_is_never_forwarded(client: HostileClient, key: str, auth: str,
                                                     mock_provider: MockProvider, provider: str, case: str) -> None:
    call = CALLS[provider]
    with client.tunnel(call.host + ":443", auth=auth) as conn:
        r = conn.exchange(call.raw(target=f"{call.path}?{QUERIES[case](key)}"))
    assert r.status < 500, r.body[:300]
    assert_key_not_forwarded(mock_provider, key)


HEADERS: dict[str, Callable[[str], tuple[str, str]]] = {
    "x-foo": lambda k: ("x-foo", k),
    "x-foo-bearer": lambda k: ("x-foo", f"Bearer {k}"),
    "inside-a-value": lambda k: ("x-debug", f"token={k}; trace=1"),
    "cookie": lambda k: ("cookie", f"session={k}"),
    "percent-encoded": lambda k: ("x-foo", k.replace("_", "%5F")),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_gateway_key_in_another_header_is_never_forwarded(client: HostileClient, key: str, auth: str,
                                                          mock_provider: MockProvider, case: str) -> None:
    with client.tunnel(auth=auth) as conn:
        r = conn.exchange(CALLS["openai"].raw(headers=[HEADERS[case](key)]))
    assert r.status < 500, r.body[:300]
    assert_key_not_forwarded(mock_provider, key)


GROQ = "https://api.groq.com/openai/v1/chat/completions"


@pytest.mark.parametrize(("mode", "status"), [("error", 401), ("header", 200), ("stream", 200)])
def test_upstream_echoing_the_team_key_is_redacted(gw: GatewayProcess, client: HostileClient, key: str,
                                                   scan: SecretScan, echo: EchoUpstream, mode: str,
                                                   status: int) -> None:
    """Groq's configured upstream is the echo server."""
    team_key = UPSTREAM_KEYS["groq"]
    body = json.dumps({"model": "llama-3.1-8b-instant", "messages": CALLS["openai"].doc["messages"],
                       "stream": mode == "stream"}).encode()
    with client.httpx(key) as h, h.stream("POST", GROQ, content=body,
                                          headers={"content-type": "application/json", MODE_HEADER: mode}) as r:
        payload = r.read()
        scan.record_httpx(r, payload)
        seen = repr(r.headers.raw).encode() + payload
        rid = request_id(r)
        got_status = r.status_code
    assert echo.keys_received == [team_key], "the gateway must send the team's key to the configured upstream"
    assert got_status == status, payload[:300]
    if mode == "stream":
        assert payload.rstrip().endswith(b"data: [DONE]"), "the stream still reaches its end"
    leaked = any(team_key in text for text in decodings(seen.decode("latin-1")))
    assert not leaked, f"the client saw the team's key ({mode}): {seen[:600]!r}"
    assert audit_row(gw, rid)["outcome"] in ("completed", "upstream_error")

