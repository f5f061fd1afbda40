"""The Forward stage: where a request goes, with which key, and what of the answer the client sees."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from spendgate.settings import Upstream
from spendgate.stages.call import REQUEST_ID_HEADER
from spendgate.stages.forward import Forward
from spendgate.stages.redaction import Redactor
from spendgate.testing import tcall, tflow, tprovider, tresponse

TEAM_KEY = "upstream-openai-team-key"
FORWARD = Forward(Redactor([TEAM_KEY]))


def test_a_model_request_goes_to_the_providers_host_on_443_with_the_team_key() -> None:
    f = tflow(headers={"accept-encoding": "gzip"})
    tcall(f, provider=tprovider(api_key=TEAM_KEY))
    FORWARD.request(f)
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "api.openai.com", 443)
    assert f.request.headers["authorization"] == f"Bearer {TEAM_KEY}"
    assert f.request.headers["accept-encoding"] == "gzip"  # only streams are asked for identity


def test_the_configured_upstream_and_each_providers_key_slot() -> None:
    up = Upstream("https", "127.0.0.1", 9443)
    f = tflow("api.anthropic.com", "/v1/messages", body={"model": "claude", "stream": True})
    tcall(f, provider=tprovider("anthropic", api_key="ant-team-key", upstream=up),
          body={"model": "claude", "stream": True})
    FORWARD.request(f)
    assert (f.request.host, f.request.port) == ("127.0.0.1", 9443)
    assert f.request.headers["x-api-key"] == "ant-team-key" and "authorization" not in f.request.headers
    assert f.request.headers["accept-encoding"] == "identity"  # a compressed stream cannot be read as it passes


def test_a_byok_key_sends_the_clients_own_key() -> None:
    f = tflow()
    tcall(f, provider=tprovider(api_key=TEAM_KEY), byok_key="client-own-provider-key")
    FORWARD.request(f)
    assert f.request.headers["authorization"] == "Bearer client-own-provider-key"


def test_a_refused_request_gets_no_key() -> None:
    f = tflow()
    tcall(f, provider=tprovider(api_key=TEAM_KEY))
    f.response = tresponse(401)
    FORWARD.request(f)
    assert "authorization" not in f.request.headers


def test_answers_carry_the_request_id_and_never_the_team_key() -> None:
    f = tflow()
    call = tcall(f, provider=tprovider(api_key=TEAM_KEY))
    f.response = tresponse(401, {"error": {"message": f"Incorrect API key provided: {TEAM_KEY}"}},
                           headers={"x-echo": f"Bearer {TEAM_KEY}"})
    FORWARD.responseheaders(f)
    FORWARD.response(f)
    assert f.response.headers[REQUEST_ID_HEADER] == call.request_id
    assert TEAM_KEY.encode() not in f.response.content and b"[redacted]" in f.response.content
    assert f.response.headers["x-echo"] == "Bearer [redacted]"


def test_a_streamed_answer_is_redacted_chunk_by_chunk_after_the_tap() -> None:
    f = tflow()
    tcall(f, provider=tprovider(api_key=TEAM_KEY))
    f.response = tresponse(content_type="text/event-stream")
    seen: list[bytes] = []

    def tap(chunk: bytes) -> list[bytes]:
        seen.append(chunk)
        return [chunk] if chunk else []

    f.response.stream = tap
    FORWARD.responseheaders(f)
    on_chunk: Any = f.response.stream
    half = len(TEAM_KEY) // 2
    out = [*on_chunk(f'data: {{"echo": "{TEAM_KEY[:half]}'.encode()), *on_chunk(f'{TEAM_KEY[half:]}"}}\n\n'.encode()),
           *on_chunk(b"")]
    assert seen[-1] == b"" and b"".join(out) == b'data: {"echo": "[redacted]"}\n\n'


def test_other_hosts_stream_through_untouched_and_unbuffered() -> None:
    f = tflow("example.com", "/big", method="PUT")
    FORWARD.requestheaders(f)
    assert f.request.stream is True
    f.response = http.Response.make(200, b"x" * 10, {"content-type": "application/octet-stream"})
    FORWARD.responseheaders(f)
    assert f.response.stream is True and f.response.headers[REQUEST_ID_HEADER].startswith("sgr_")
