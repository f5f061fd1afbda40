"""No silent resets (issue 13): a request mitmproxy's HTTP/2 stack would answer by tearing the
connection down gets a clear answer where one is possible, and always a log line with the reason.

curl exactly as the provider docs show it, with ``$OPENAI_API_KEY`` unset, sends
``authorization: Bearer `` (a trailing space); HTTP/2 forbids surrounding whitespace and h2
resets the whole connection. The gateway trims it, as HTTP/1 does, and answers. What would be
dangerous to pass on (CR/LF in a value, connection-specific headers) still closes the
connection, now with a log line that says why.
"""

from __future__ import annotations

import json
import subprocess

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.hostile import HostileClient, assert_provider_error, audit_row, request_id
from tests.rig.mock_provider import MockProvider
from tests.rig.rawclient import h2_request

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})


def http2_answer(out: str) -> tuple[str, str]:
    """(head, body) of the HTTP/2 answer in ``curl -i`` output (after the proxy's CONNECT answer)."""
    blocks = out.split("\n\n")
    i = next(i for i, b in enumerate(blocks) if b.startswith("HTTP/2"))
    return blocks[i], "\n\n".join(blocks[i + 1:])


def log_line(gw: GatewayProcess, needle: str) -> str:
    """The gateway's log line holding ``needle`` (waiting for it)."""
    text = gw.wait_for_log(needle)
    return next(line for line in text.splitlines() if needle in line)


def _h2_chat(extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "https"), (":authority", "api.openai.com"),
            (":path", "/v1/chat/completions"), ("content-type", "application/json"), *extra]


def test_curl_as_the_docs_show_it_with_the_key_unset_is_answered_over_http2(
        gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    """With proxy credentials the request is attributed and served; without any, a provider-shaped 401."""
    args = ["--http2", "-i", "https://api.openai.com/v1/chat/completions", "-H", "Content-Type: application/json",
            "-H", "Authorization: Bearer ", "-d", BODY]
    served = gw.curl(args, key, user="mallory")
    assert served.returncode == 0, served.stderr
    head, _ = http2_answer(served.stdout)
    assert head.startswith("HTTP/2 200"), served.stdout[:500]
    (rec,) = mock_provider.wait_for(1)
    assert rec.header("authorization") == f"Bearer {UPSTREAM_KEYS['openai']}"
    rid = next(line.split(":", 1)[1].strip() for line in head.splitlines()
               if line.lower().startswith("x-spendgate-request-id:"))
    row = audit_row(gw, rid)
    assert (row["user"], row["outcome"], row["model_requested"]) == ("mallory", "completed", "gpt-4o-mini")

    cmd = ["curl", "-sS", "--http2", "-x", f"http://127.0.0.1:{gw.port}", "--cacert", str(gw.ca_path), *args]
    bare = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert bare.returncode == 0, bare.stderr  # an answer, not "HTTP/2 stream was not closed cleanly"
    head, body = http2_answer(bare.stdout)
    assert head.startswith("HTTP/2 401"), bare.stdout[:500]
    assert json.loads(body)["error"]["code"] == "spendgate_no_key", body
    assert len(mock_provider.requests) == 1


def test_surrounding_whitespace_in_any_header_value_is_trimmed(client: HostileClient, auth: str,
                                                               mock_provider: MockProvider) -> None:
    with client.tunnel("api.openai.com:443", auth=auth, alpn=["h2"]) as conn:
        r = h2_request(conn, _h2_chat([("x-trace", " abc\t"), ("accept", "application/json ")]), BODY.encode())
    assert r.status == 200, r.body[:300]
    (rec,) = mock_provider.wait_for(1)
    assert rec.header("x-trace") == "abc"
    request_id(r)


def test_a_value_with_a_line_break_closes_the_connection_with_a_log_line(
        gw: GatewayProcess, client: HostileClient, auth: str, mock_provider: MockProvider) -> None:
    with client.tunnel("api.openai.com:443", auth=auth, alpn=["h2"]) as conn:
        r = h2_request(conn, _h2_chat([("x-inject", "a\r\nx-api-key: evil")]), BODY.encode())
    assert r.status == 0  # refused at the connection: no request was made of it
    assert mock_provider.requests == []
    line = log_line(gw, "CR, LF or NUL")
    assert "HTTP/2 connection closed" in line and "x-inject" in line, line


def test_a_connection_specific_header_closes_the_connection_with_a_log_line(
        gw: GatewayProcess, client: HostileClient, auth: str, mock_provider: MockProvider) -> None:
    with client.tunnel("api.openai.com:443", auth=auth, alpn=["h2"]) as conn:
        r = h2_request(conn, _h2_chat([("transfer-encoding", "chunked")]), BODY.encode())
    assert r.status == 0
    assert mock_provider.requests == []
    assert "HTTP/2 connection closed" in log_line(gw, "connection-specific header 'transfer-encoding'")


def test_every_refusal_logs_its_reason_without_the_credential(gw: GatewayProcess, client: HostileClient,
                                                              key: str) -> None:
    """A key in the query string is refused as unknown/invalid; the log line says why and never holds it."""
    forged = key[:-4] + "AAAA"
    with client.httpx(None) as h:
        r = h.get(f"https://api.openai.com/v1/models?key={forged}")
    assert_provider_error(r, "openai", 401)
    rid = request_id(r)
    line = log_line(gw, rid)
    assert "refused" in line and "401" in line and "spendgate_unknown_key" in line, line
    assert forged not in gw.log_text() and key not in gw.log_text()
