"""Real clients through a real `spendgate serve`: the openai and anthropic SDKs, curl, and Gemini REST.

Each goes once with the gateway key in the proxy URL (HTTPS_PROXY) and once with it where the
SDK puts its API key. The mock must see the team's upstream key in the provider's header and
nothing of the gateway key; the client must get the mock's answer byte for byte, and streams
must arrive as they are produced, not at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess
from tests.rig.mock_provider import MockProvider, RecordedRequest, content_pieces

MSGS = [{"role": "user", "content": "Say hello"}]
TEXT = "".join(content_pieces(5))
CLAUDE = "claude-sonnet-4-20250514"
OPENAI_CHAT = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_MESSAGES = "https://api.anthropic.com/v1/messages"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash"
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}
SLOW = "slow; delay_ms=300; chunks=5"
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
GATEWAY_KEY_RE = re.compile(rb"sg_[a-z0-9]{8}_[A-Za-z0-9]{32,}")
VIAS = ["proxy", "apikey"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-clients"), _mock_provider_session.url, name="clients")
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]  # conftest attaches its log to a failing test's report


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    return str(gw.create_key("alice", team="core")["key"])


# --------------------------------------------------------------------------- checks


def assert_no_gateway_key(rec: RecordedRequest, key: str) -> None:
    """Nothing the mock received (headers, path, query, body) carries a gateway key or its secret."""
    seen = b"\n".join([
        "\n".join(f"{k}: {v}" for k, v in rec.header_list).encode(), rec.path.encode(), rec.query.encode(), rec.body,
    ])
    secret = key.rsplit("_", 1)[1].encode()
    assert key.encode() not in seen and secret not in seen
    assert not GATEWAY_KEY_RE.search(seen), seen


def assert_upstream_auth(rec: RecordedRequest, provider: str, key: str) -> None:
    header = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[provider]
    value = f"Bearer {UPSTREAM_KEYS['openai']}" if provider == "openai" else UPSTREAM_KEYS[provider]
    sent = [(k.lower(), v) for k, v in rec.header_list if k.lower() in KEY_HEADERS]
    assert sent == [(header, value)]  # exactly one credential, the right one, in the right place
    assert "key" not in rec.query_params
    assert "proxy-authorization" not in rec.headers
    assert_no_gateway_key(rec, key)


def only_request(mock: MockProvider) -> RecordedRequest:
    recs = mock.wait_for(1)
    assert len(recs) == 1, [(r.method, r.path) for r in recs]
    return recs[0]


def without_injected_usage(body: bytes) -> bytes:
    """The mock's OpenAI stream as the gateway must hand it on when the gateway (not the client)
    set `stream_options.include_usage`: the usage-only chunk and each `,"usage":null` removed,
    every other byte (including `data: [DONE]`) unchanged."""
    out = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        data = block.removeprefix(b"data: ")
        if data != b"[DONE]":
            obj = json.loads(data)
            if obj.get("choices") == [] and obj.get("usage") is not None:
                continue
            block = block.replace(b',"usage":null', b"")
        out.append(block + b"\n\n")
    return b"".join(out)


def assert_spread(times: list[float], t0: float, t_end: float) -> None:
    """Events were received as produced (the mock waits 300 ms between them), not in one lump."""
    assert len(times) >= 5
    first = times[0] - t0
    total = t_end - t0
    assert first < total - 0.6, (first, total)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(1 for g in gaps if g > 0.1) >= 3, gaps


# --------------------------------------------------------------------------- openai SDK


@pytest.mark.parametrize("via", VIAS)
def test_openai_chat(gw: GatewayProcess, key: str, mock_provider: MockProvider, via: str) -> None:
    client = gw.openai_client(key, via=via)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
    rec = only_request(mock_provider)
    assert raw.status_code == 200
    assert raw.http_response.content == rec.response_body  # byte for byte
    assert raw.headers["x-spendgate-request-id"].startswith("sgr_")
    assert raw.headers["x-request-id"] == rec.request_id  # provider headers pass through
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.usage is not None and completion.usage.prompt_tokens == rec.tokens["input_tokens"]
    assert (rec.provider, rec.endpoint, rec.model, rec.host.split(":")[0]) == (
        "openai", "chat", "gpt-4o-mini", "127.0.0.1")
    assert json.loads(rec.body) == {"model": "gpt-4o-mini", "messages": MSGS}
    assert_upstream_auth(rec, "openai", key)


@pytest.mark.parametrize("via", VIAS)
def test_openai_chat_stream_client_asked_for_usage(gw: GatewayProcess, key: str, mock_provider: MockProvider,
                                                   via: str) -> None:
    """The client set include_usage itself: the gateway changes nothing, every byte arrives."""
    client = gw.openai_client(key, via=via)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True}
    ) as resp:
        got = b"".join(resp.iter_bytes())
    rec = only_request(mock_provider)
    assert rec.completed and rec.include_usage
    assert got == rec.response_body
    assert got.endswith(b"data: [DONE]\n\n")
    assert_upstream_auth(rec, "openai", key)


@pytest.mark.parametrize("via", VIAS)
def test_openai_chat_stream_gateway_asked_for_usage(gw: GatewayProcess, key: str, mock_provider: MockProvider,
                                                    via: str) -> None:
    """The gateway adds include_usage to learn exact counts and takes back exactly what that added.

    A second request to the mock would not do as a reference (its id and timestamp differ), so
    the expectation is derived from the bytes the mock sent: same bytes minus the usage chunk
    and the `,"usage":null` spans — including the final `data: [DONE]`.
    """
    client = gw.openai_client(key, via=via)
    with client.chat.completions.with_streaming_response.create(model="gpt-4o", messages=MSGS, stream=True) as resp:
        got = b"".join(resp.iter_bytes())
    rec = only_request(mock_provider)
    assert rec.include_usage and rec.completed  # the gateway asked upstream for usage
    sent = json.loads(rec.body)
    assert sent.pop("stream_options") == {"include_usage": True}
    assert sent == {"model": "gpt-4o", "messages": MSGS, "stream": True}
    assert b'"usage"' not in got
    assert got == without_injected_usage(rec.response_body)
    assert got.endswith(b"data: [DONE]\n\n")
    # and the SDK's own parsing sees the whole answer
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert all(c.usage is None for c in chunks)
    assert_upstream_auth(mock_provider.last, "openai", key)


# --------------------------------------------------------------------------- anthropic SDK


@pytest.mark.parametrize("via", VIAS)
def test_anthropic_messages(gw: GatewayProcess, key: str, mock_provider: MockProvider, via: str) -> None:
    client = gw.anthropic_client(key, via=via)
    raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=MSGS)
    rec = only_request(mock_provider)
    assert raw.status_code == 200
    assert raw.http_response.content == rec.response_body
    assert raw.headers["x-spendgate-request-id"].startswith("sgr_")
    msg = raw.parse()
    assert msg.content[0].text == TEXT  # type: ignore[union-attr]
    assert msg.usage.input_tokens == rec.tokens["input_tokens"]
    assert (rec.provider, rec.endpoint, rec.model) == ("anthropic", "messages", CLAUDE)
    assert "anthropic-version" in rec.headers
    assert_upstream_auth(rec, "anthropic", key)


@pytest.mark.parametrize("via", VIAS)
def test_anthropic_messages_stream(gw: GatewayProcess, key: str, mock_provider: MockProvider, via: str) -> None:
    client = gw.anthropic_client(key, via=via)
    with client.messages.with_streaming_response.create(model=CLAUDE, max_tokens=64, messages=MSGS,
                                                        stream=True) as resp:
        got = b"".join(resp.iter_bytes())
    rec = only_request(mock_provider)
    assert rec.stream and rec.completed
    assert got == rec.response_body
    assert_upstream_auth(rec, "anthropic", key)
    # the SDK's stream helper, on the same path
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=MSGS) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == TEXT  # type: ignore[union-attr]
    assert final.usage.output_tokens == 5
    assert_upstream_auth(mock_provider.last, "anthropic", key)


# --------------------------------------------------------------------------- curl


def run_curl(gw: GatewayProcess, tmp_path: Path, args: list[str], key: str | None = None,
             env_proxy: bool = False) -> tuple[int, bytes]:
    """Real curl; returns (status, body bytes). With env_proxy the proxy and CA come from the
    environment a developer pastes (HTTPS_PROXY, CURL_CA_BUNDLE), else from -x / --cacert."""
    out = tmp_path / f"curl-{uuid.uuid4().hex}.out"
    cmd = ["curl", "-sS", "-N", "-o", str(out), "-w", "%{http_code}", "--max-time", "30"]
    if env_proxy:
        env = gw.client_env(key)
    else:
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
        cmd += ["-x", gw.proxy_url(key), "--cacert", str(gw.ca_path)]
    cp = subprocess.run(cmd + args, capture_output=True, timeout=40, env=env)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    return int(cp.stdout), out.read_bytes()


@pytest.mark.parametrize("via", VIAS)
def test_curl_openai_chat(gw: GatewayProcess, key: str, mock_provider: MockProvider, tmp_path: Path, via: str) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSGS})
    args = [OPENAI_CHAT, "-H", "content-type: application/json", "-d", body]
    if via == "apikey":
        args += ["-H", f"Authorization: Bearer {key}"]
    status, got = run_curl(gw, tmp_path, args, key if via == "proxy" else None, env_proxy=True)
    rec = only_request(mock_provider)
    assert status == 200
    assert got == rec.response_body
    assert rec.body == body.encode()
    assert_upstream_auth(rec, "openai", key)


@pytest.mark.parametrize("via", VIAS)
def test_curl_anthropic_stream(gw: GatewayProcess, key: str, mock_provider: MockProvider, tmp_path: Path,
                               via: str) -> None:
    body = json.dumps({"model": CLAUDE, "max_tokens": 64, "messages": MSGS, "stream": True})
    args = [ANTHROPIC_MESSAGES, "-H", "content-type: application/json", "-H", "anthropic-version: 2023-06-01",
            "-d", body]
    if via == "apikey":
        args += ["-H", f"x-api-key: {key}"]
    status, got = run_curl(gw, tmp_path, args, key if via == "proxy" else None)
    rec = only_request(mock_provider)
    assert status == 200 and rec.stream and rec.completed
    assert got == rec.response_body
    assert_upstream_auth(rec, "anthropic", key)


@pytest.mark.parametrize("via", ["proxy", "query", "header"])
def test_curl_gemini(gw: GatewayProcess, key: str, mock_provider: MockProvider, tmp_path: Path, via: str) -> None:
    url = f"{GEMINI}:generateContent" + (f"?key={key}" if via == "query" else "")
    args = [url, "-H", "content-type: application/json", "-d", json.dumps(GEMINI_BODY)]
    if via == "header":
        args += ["-H", f"x-goog-api-key: {key}"]
    status, got = run_curl(gw, tmp_path, args, key if via == "proxy" else None)
    rec = only_request(mock_provider)
    assert status == 200
    assert got == rec.response_body
    assert rec.query == ""
    assert_upstream_auth(rec, "gemini", key)


# --------------------------------------------------------------------------- Gemini REST (httpx)


def gemini_client(gw: GatewayProcess, key: str, via: str) -> tuple[httpx.Client, dict[str, str], str]:
    """(client, headers, query suffix) for a gateway key placed per `via`."""
    if via == "proxy":
        return gw.httpx_client(key), {}, ""
    if via == "header":
        return gw.httpx_client(None), {"x-goog-api-key": key}, ""
    return gw.httpx_client(None), {}, f"key={key}"


@pytest.mark.parametrize("via", ["proxy", "header", "query"])
def test_gemini_generate(gw: GatewayProcess, key: str, mock_provider: MockProvider, via: str) -> None:
    client, headers, query = gemini_client(gw, key, via)
    with client:
        r = client.post(f"{GEMINI}:generateContent" + (f"?{query}" if query else ""), json=GEMINI_BODY, headers=headers)
    rec = only_request(mock_provider)
    assert r.status_code == 200
    assert r.content == rec.response_body
    assert r.json()["candidates"][0]["content"]["parts"][0]["text"] == TEXT
    assert (rec.provider, rec.endpoint, rec.model) == ("gemini", "generate", "gemini-2.0-flash")
    assert rec.query == ""
    assert_upstream_auth(rec, "gemini", key)


@pytest.mark.parametrize("via", ["proxy", "header", "query"])
def test_gemini_stream(gw: GatewayProcess, key: str, mock_provider: MockProvider, via: str) -> None:
    client, headers, query = gemini_client(gw, key, via)
    url = f"{GEMINI}:streamGenerateContent?alt=sse" + (f"&{query}" if query else "")
    with client, client.stream("POST", url, json=GEMINI_BODY, headers=headers) as r:
        got = b"".join(r.iter_raw())
    rec = only_request(mock_provider)
    assert r.status_code == 200 and rec.completed
    assert got == rec.response_body
    assert rec.query == "alt=sse"  # the key is gone, the rest of the query is untouched
    assert_upstream_auth(rec, "gemini", key)


def test_gemini_stream_json_array(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    with gw.httpx_client(key) as client, client.stream("POST", f"{GEMINI}:streamGenerateContent",
                                                        json=GEMINI_BODY) as r:
        got = b"".join(r.iter_raw())
    rec = only_request(mock_provider)
    assert r.status_code == 200 and rec.completed
    assert got == rec.response_body
    assert "".join(o["candidates"][0]["content"]["parts"][0]["text"] for o in json.loads(got)) == TEXT
    assert_upstream_auth(rec, "gemini", key)


# --------------------------------------------------------------------------- the developer's environment


def test_sdks_configured_only_by_the_environment(gw: GatewayProcess, key: str, mock_provider: MockProvider,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA in code: HTTPS_PROXY and SSL_CERT_FILE as `spendgate onboard` prints them."""
    for k in list(os.environ):
        if k.lower() in ("https_proxy", "http_proxy", "all_proxy", "no_proxy", "ssl_cert_dir"):
            monkeypatch.delenv(k)
    for k, v in gw.client_env(key).items():
        if k.lower() in ("https_proxy", "http_proxy") or k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(k, v)
    oai = openai.OpenAI(api_key="not-a-real-key", max_retries=0, timeout=30)
    assert oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices[0].message.content == TEXT
    ant = anthropic.Anthropic(api_key="not-a-real-key", max_retries=0, timeout=30)
    assert ant.messages.create(model=CLAUDE, max_tokens=16, messages=MSGS).content[0].text == TEXT  # type: ignore[union-attr]
    recs = mock_provider.wait_for(2)
    assert [r.provider for r in recs] == ["openai", "anthropic"]
    assert_upstream_auth(recs[0], "openai", key)
    assert_upstream_auth(recs[1], "anthropic", key)


# --------------------------------------------------------------------------- streams are not buffered


def test_openai_stream_arrives_chunk_by_chunk(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    client = gw.openai_client(key)
    t0 = time.monotonic()
    times, text = [], []
    for chunk in client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True,
                                                extra_headers={"x-mock-scenario": SLOW}):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
    t_end = time.monotonic()
    assert "".join(text) == TEXT
    assert_spread(times, t0, t_end)
    assert only_request(mock_provider).scenario.stream_delay_s == 0.3


def test_anthropic_stream_arrives_chunk_by_chunk(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    client = gw.anthropic_client(key, via="apikey")
    t0 = time.monotonic()
    times, text = [], []
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=MSGS,
                                extra_headers={"x-mock-scenario": SLOW}) as stream:
        for piece in stream.text_stream:
            times.append(time.monotonic())
            text.append(piece)
    t_end = time.monotonic()
    assert "".join(text) == TEXT
    assert_spread(times, t0, t_end)
    assert only_request(mock_provider).scenario.stream_delay_s == 0.3


def test_gemini_stream_arrives_chunk_by_chunk(gw: GatewayProcess, key: str, mock_provider: MockProvider) -> None:
    t0 = time.monotonic()
    times: list[float] = []
    got = b""
    with gw.httpx_client(None) as client, client.stream(
        "POST", f"{GEMINI}:streamGenerateContent?alt=sse&key={key}", json=GEMINI_BODY,
        headers={"x-mock-scenario": SLOW},
    ) as r:
        for piece in r.iter_raw():
            times.append(time.monotonic())
            got += piece
    t_end = time.monotonic()
    rec = only_request(mock_provider)
    assert got == rec.response_body
    assert_spread(times, t0, t_end)
